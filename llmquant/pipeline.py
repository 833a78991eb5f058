"""The one quantization pipeline: checkpoint -> calibration -> runner -> solver -> sink -> file.

The float checkpoint is never loaded whole: its skeleton lives on the meta device and the runner reads
each decoder block from the shards right before solving it. The output format is a sink (see
formats/registry.py) that the runner hands each finished block to; it writes into a hidden temporary
that replaces `out` only when complete.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .config import QuantConfig, QuantReport
from .errors import UserError
from .formats.atomic import atomic_directory, atomic_file, check_destination, scratch_directory
from .formats.registry import format_for
from .memory import Budget, default_budget, parse_size
from .methods import make_solver
from .models.checkpoint import Checkpoint
from .activations import BATCH_TOKENS
from .runner import run_layers


def quantize(model: str | Path, config: QuantConfig, out: str | Path, force: bool = False,
             progress: bool = True, work_dir: str | Path | None = None, resume: bool = False,
             dry_run_allocation: bool = False) -> QuantReport | None:
    """Quantize a float checkpoint (directory, Hub id or 'demo') and write the packed result to `out`.

    With `work_dir`, every finished block is kept there durably; `resume` continues such a run. With
    config.target_bpw, each linear's setting is allocated first (allocation.py); `dry_run_allocation`
    prints that plan and returns None without writing anything.
    """
    config.validate()
    fmt = format_for(config.format)
    if resume and work_dir is None:
        raise UserError("--resume needs the --work-dir of the run to continue")
    out = Path(out)
    check_paths(model, out, work_dir)
    if not dry_run_allocation:  # a dry run writes nothing: whatever is at `out` does not matter
        check_destination(out, force, directory=not fmt.single_file)
    start = time.perf_counter()
    checkpoint = Checkpoint(model)
    adapter = checkpoint.adapter
    if config.method.startswith("awq") and not adapter.scaling_pairs:
        raise UserError(f"--method {config.method} needs AWQ scaling pairs (previous op -> linears), and the "
                        f"{adapter.family} adapter defines none; use --method rtn or gptq")
    if adapter.n_experts and (config.float_targets or config.tune_iters):
        raise UserError("--float-targets and --tune-iters fit each linear to the float model's inputs, and routing "
                        "sends an expert other tokens in the float model than in the quantized one: not supported "
                        f"for mixture-of-experts families ({adapter.family}) yet")
    plan = fmt.plan(checkpoint, config)
    check_float_share(plan, config)
    calibrated = config.method != "rtn"  # every method but rtn observes activations
    budget = memory_budget(config, checkpoint, calibrated)
    tokenizer = checkpoint.tokenizer()
    samples = None
    if calibrated or config.target_bpw is not None:  # the source used is what the work dir and the card record
        samples, source = calibration_samples(config, checkpoint, tokenizer)
        config = replace(config, calib=source)
    if config.target_bpw is not None:
        from .allocation import allocate_plan, print_plan

        config, plan = allocate_plan(fmt, checkpoint, config, plan, samples, progress)
        if dry_run_allocation:
            print_plan(plan.allocation, fmt.describe, file=sys.stdout)
            return None
    solver = make_solver(config, config.spec(), adapter.pairs_at, set(plan.targets), inner=plan.grid,
                         overrides=plan.overrides, fisher=plan.allocation.fisher if plan.allocation else None)
    assert solver.calibrated == calibrated, "methods.py and the pipeline disagree on calibration"
    on_gpu = torch.device(config.device).type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(config.device)
    workdir = open_workdir(work_dir, resume, checkpoint.path, samples, config)
    destination = atomic_file if fmt.single_file else atomic_directory
    with destination(out, force) as tmp, spill_directory(work_dir, out) as spill:
        sink = fmt.open(tmp, checkpoint, config, plan, tokenizer, str(model))
        try:
            run_layers(checkpoint.model, adapter, solver, set(plan.targets), samples, config.device,
                       progress=progress, workdir=workdir, sink=sink, checkpoint=checkpoint, budget=budget,
                       spill_dir=spill, expert_min_tokens=config.expert_min_tokens)
            report = {"method": config.method, "linears": solver.report} if solver.report else {}
            if plan.allocation is not None:
                report["allocation"] = plan.allocation.to_dict(fmt.describe)
            sink.finish(report or None)
        except BaseException:
            sink.abort()
            raise
        if not fmt.single_file:  # a folder carries its model card; a GGUF file gets one when pushed
            from .publish import write_card

            write_card(tmp)
    figures = fmt.figures(out, sink)
    return QuantReport(str(out), config.method, config.bits, config.group_size, config.sym,
                       time.perf_counter() - start, figures["size_bytes"], figures["bpw"], len(plan.targets),
                       plan.skipped, gguf_types=figures.get("gguf_types"),
                       peak_gpu_bytes=torch.cuda.max_memory_allocated(config.device) if on_gpu else None,
                       bits_per_parameter=figures["bits_per_parameter"],
                       allocation=plan.allocation.to_dict(fmt.describe) if plan.allocation is not None else None)


MOST_FLOAT = 0.1  # the share of linears a format may leave in float before the run needs --allow-float


def check_float_share(plan, config: QuantConfig) -> None:
    """Linears the format cannot pack stay in float: a few with a warning, many only when asked for, since
    the result would be far larger than the bits suggest."""
    if not plan.skipped:
        return
    import warnings

    share = len(plan.skipped) / (len(plan.skipped) + len(plan.targets))
    what = (f"{len(plan.skipped)} of {len(plan.skipped) + len(plan.targets)} linears have widths the "
            f"{config.format} layout cannot pack at {config.bits} bits, group {config.group_size} "
            f"(first: {plan.skipped[0]})")
    if share > MOST_FLOAT and not config.allow_float:
        hint = " or --format gptq" if config.format == "awq" else ""
        raise UserError(f"{what}: they would stay in float. Choose a --group-size that divides their widths"
                        f"{hint}, or pass --allow-float to go ahead")
    warnings.warn(f"{what} and stay in float")


def memory_budget(config: QuantConfig, checkpoint: Checkpoint, calibrated: bool) -> Budget:
    """The run's host-memory budget; refuses one too small for a single block before any work."""
    adapter, model = checkpoint.adapter, checkpoint.model
    blocks = adapter.blocks(model)
    params = max(sum(p.numel() for p in block.parameters()) for block in blocks)  # the largest (dense ones first)
    widest = max((m.in_features for m in blocks.modules() if isinstance(m, torch.nn.Linear)), default=0)
    # the Hessian, its act-order permutation, the damped copy and its Cholesky factor: float32, at once
    solver_bytes = 4 * widest * widest * 4 if calibrated else 0
    limit = parse_size(config.max_memory) if config.max_memory else default_budget()
    budget = Budget(limit, params, solver_bytes, BATCH_TOKENS * checkpoint.config.hidden_size * 4 if calibrated else 0)
    budget.check_block()
    return budget


@contextlib.contextmanager
def spill_directory(work_dir: str | Path | None, out: Path):
    """Where activations beyond the budget are memory-mapped: the work dir, else a hidden scratch folder
    beside the output, removed at the end."""
    if work_dir is not None:
        yield Path(work_dir)
        return
    with scratch_directory(out) as d:
        yield d


def calibration_samples(config: QuantConfig, checkpoint: Checkpoint, tokenizer) -> tuple[torch.Tensor, str]:
    """config's calibration windows, no longer than the model's context, and the source they came from.
    Without --calib: the default recipe, or, when the Hub cannot give it, text the model writes itself (with
    a notice). `self` calibration generates text with the model, so only that source loads the whole float
    model."""
    import sys

    from .calibration import DEFAULT_RECIPE, SELF, HubUnavailable, load_samples

    seqlen = min(config.seqlen, getattr(checkpoint.config, "max_position_embeddings", config.seqlen))
    if config.calib is None:
        try:
            return load_samples(DEFAULT_RECIPE, tokenizer, config.n_samples, seqlen, config.seed), DEFAULT_RECIPE
        except HubUnavailable:
            print(f"note: the default calibration data ({DEFAULT_RECIPE}) needs the Hugging Face Hub, which is "
                  f"unreachable; the model writes its own calibration text instead (--calib self). Pass --calib "
                  f"FILE to calibrate on your own text", file=sys.stderr)
    source = config.calib or SELF
    model = None
    if source == SELF:
        from .models.loader import load_float_model

        model = load_float_model(checkpoint.path)[0]
    return load_samples(source, tokenizer, config.n_samples, seqlen, config.seed, model=model), source


def check_paths(model: str | Path, out: Path, work_dir: str | Path | None) -> None:
    """Refuse, before any work, output and work paths that would fail at the end or destroy an input:
    the output replaces whatever is at `out` when the run ends, and nothing is ever written into the model."""
    out = out.resolve()
    source = Path(model).resolve() if Path(model).exists() else None
    if source is not None and (source == out or out in source.parents or source in out.parents):
        raise UserError(f"--out {out} would replace the model being quantized, or write into it; choose another path")
    if work_dir is not None:
        work = Path(work_dir).resolve()
        if work.exists() and not work.is_dir():
            raise UserError(f"--work-dir {work} exists and is not a directory")
        if work == out or out in work.parents:
            raise UserError(f"--work-dir {work} lies inside --out, which is replaced when the run ends; "
                            f"choose a work directory elsewhere")
        if source is not None and (work == source or source in work.parents):
            raise UserError(f"--work-dir {work} lies inside the model being quantized; choose a work directory "
                            f"elsewhere")


def open_workdir(work_dir: str | Path | None, resume: bool, source: Path, samples: torch.Tensor | None,
                 config: QuantConfig):
    """The run's resume.WorkDir, fingerprinted by model, calibration and settings; None without one."""
    if work_dir is None:
        return None
    from .resume import WorkDir, fingerprint

    settings = {k: v for k, v in asdict(config).items() if k != "max_memory"}  # where, not what, it computes
    return WorkDir(Path(work_dir), fingerprint(source, samples, settings), resume)
