"""The layer-by-layer runner: one decoder block on the work device at a time.

Captures the inputs of block 0 (hidden states plus the keyword arguments the block needs:
attention mask, position ids, rotary embeddings), then for each block: moves it to the work
device, lets the solver observe the inputs of each sequential group of linears, writes the
quantized weights back, and propagates the samples through the *quantized* block so the next
block is calibrated on what it will really see. Solver-agnostic: a solver that needs no
statistics (RTN) costs no forward passes at all. A solver with `float_targets` also gets, for each
token, the float model's input of the same linear: the runner then carries a second stream of
hidden states through an unquantized copy of each block.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import (BATCH_TOKENS, BlockInputs, Captured, Replay, budgeted_allocator, capture_inputs,
                          forward_block, in_memory)
from .memory import solving
from .models.adapters import ArchAdapter
from .models.checkpoint import prefix_of
from .models.experts import expert_of, merged_name
from .numerics.grid import QuantizedWeight


class Observer(Protocol):
    def add(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """reference: the float model's input for the same tokens (only for solvers with float_targets)."""


class Solver(Protocol):
    """What the runner drives. A solver may also define `prepare_block(block, prefix, inputs, batch)`,
    called once per block on the work device before any group is observed (AWQ's scale search), and,
    with `tunes_blocks`, `finish_block(block, prefix, inputs, targets, results)`, called once the block's
    linears are all quantized with `targets` the float block's outputs on the float stream, which returns
    better results for them (see quant/tune.py)."""

    calibrated: bool  # False: quantizes from the weight alone, no forward passes
    float_targets: bool  # observers also see the float model's inputs (optional attribute; default False)
    tunes_blocks: bool  # finish_block tunes each block against the float block (optional; default False)
    report: dict[str, dict]  # per-linear figures (loss, time, fallbacks), filled by quantize

    def observer(self, names: list[str], linears: list[nn.Linear]) -> Observer | None:
        """Statistics of the input shared by a sequential group of linears (e.g. q/k/v); None: none needed."""

    def quantize(self, name: str, linear: nn.Linear, observer: Observer | None) -> QuantizedWeight:
        """The linear's weight on the solver's grid (or a GGUF BlockTensor): anything with
        `dequantize(dtype)` and `cpu()`."""


def _observe_then_stop(observer: Observer, kept: list | None = None, record: list | None = None):
    """Forward pre-hook: feed the linear's input to the observer (with the float model's input for the
    same tokens, which the reference block's hook put in `kept`), then skip the rest of the block.
    With `record`, also keep the input for a later replay of the child it ends (see Replay)."""

    def hook(module, args):
        observer.add(args[0], *([kept.pop()] if kept is not None else []))
        if record is not None:
            record.append(args[0])
        raise Captured

    return hook


def _keep_then_stop(kept: list, record: list | None = None):
    """Forward pre-hook on the reference block: keep the linear's float input for the observer."""

    def hook(module, args):
        kept.append(args[0])
        if record is not None:
            record.append(args[0])
        raise Captured

    return hook


def _replay_finished(block: nn.Module, adapter: ArchAdapter, solved: set[str], tail_inputs: dict[str, list]) -> None:
    """Swap in a Replay for each replayable child all of whose linears are solved (or left in float)."""
    for name in adapter.replayable:
        child = getattr(block, name, None)
        if child is None or isinstance(child, Replay):
            continue
        inside = [n for n in adapter.linears() if n.startswith(name + ".")]
        if inside and all(n in solved for n in inside):
            tail, with_weights = adapter.tails.get(name, (None, False))
            kept = tail_inputs.get(f"{name}.{tail}")
            if not kept and solved.issuperset(adapter.linears()):
                continue  # only the last pass is left: a recorded output would never be read
            setattr(block, name, Replay(child, tail and child.get_submodule(tail), kept, with_weights))


def _keep(nbytes: int, inputs: BlockInputs) -> bool:
    """Whether `nbytes` more of optional replay records may be kept: within the run's budget on the host
    (taken from it; `_solve_block` gives it back), or leaving at least as much free on a GPU."""
    if inputs.device.type == "cuda":
        return 2 * nbytes <= torch.cuda.mem_get_info(inputs.device)[0]
    if inputs.budget is not None:
        return inputs.budget.take(nbytes)
    try:
        return 2 * nbytes <= os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not on every platform: then recompute rather than guess
        return False


def _write_back(linear: nn.Linear, qw: QuantizedWeight, dtype: torch.dtype) -> None:
    """The model in memory computes with what the packed checkpoint will hold."""
    with torch.no_grad():
        linear.weight.copy_(qw.dequantize(dtype).to(linear.weight.device))


def _stages(groups) -> list[list[tuple[str, ...]]]:
    """The forward passes a block's groups are observed in: consecutive groups that differ only in an
    expert's index (every expert's gate/up, then every down) share one pass; any other group has its own."""
    out, keys = [], []
    for group in groups:
        key = tuple(merged_name(n) for n in group)
        if out and keys[-1] == key and any(expert_of(n) for n in group):
            out[-1].append(group)
        else:
            out.append([group])
            keys.append(key)
    return out


def _observe(block, observed, names, observer, tails, tail_inputs, inputs, batch) -> int:
    """One pass that feeds the group's input to `observer` (with the float model's, when `observed` is the
    reference block) and stops at the group. A tail linear's inputs are also kept for replays while the
    budget allows; returns the bytes so taken from it."""
    kept = [] if observed is not None else None
    first, linear = names[0], block.get_submodule(names[0])
    records, held = {}, 0
    if len(names) == 1 and first in tails:
        width = inputs.hidden.shape[0] * inputs.hidden.shape[1] * linear.in_features
        nbytes = width * inputs.hidden.element_size() * (1 + (observed is not None))
        if _keep(nbytes, inputs):
            held = nbytes if inputs.budget is not None else 0
            records = {m: tail_inputs.setdefault(m, {}).setdefault(first, []) for m in (block, observed) if m is not None}
    hooks = [linear.register_forward_pre_hook(_observe_then_stop(observer, kept, records.get(block)))]
    if observed is not None:
        hooks.append(observed.get_submodule(first).register_forward_pre_hook(_keep_then_stop(kept, records.get(observed))))
    try:
        forward_block(block, inputs, batch, update=False, reference=observed)
    finally:
        for hook in hooks:
            hook.remove()
    return held


def _observe_experts(block, prefix, groups, solver, targets, inputs, batch,
                     min_tokens: int | None = None) -> dict[str, tuple]:
    """Every expert's group observed from the tokens the router sends it, all in one pass; an expert sent
    fewer than `min_tokens` (default: as many as its linears have inputs, the least for a full-rank
    Hessian; none at all included) is observed again on every calibration token, in a second pass for
    observation only (the block's propagated output keeps the real routing). Returns linear -> (observer,
    what it saw)."""
    groups = [[n for n in g if prefix + n in targets] for g in groups]
    groups = [g for g in groups if g]
    if not solver.calibrated:
        return {n: (None, None) for g in groups for n in g}

    def one_pass(chosen, everything):
        observers = {i: solver.observer([prefix + n for n in groups[i]], [block.get_submodule(n) for n in groups[i]])
                     for i in chosen}
        chosen = [i for i in chosen if observers[i] is not None]  # None: no statistics needed (AWQ over RTN)
        tokens = dict.fromkeys(chosen, 0)
        if not chosen:
            return observers, tokens
        hooks, lists = [], set()
        for i in chosen:
            def hook(module, args, i=i):
                observers[i].add(args[0])
                tokens[i] += args[0].numel() // args[0].shape[-1]
            hooks.append(block.get_submodule(groups[i][0]).register_forward_pre_hook(hook))
            if everything:
                path, index, _ = expert_of(groups[i][0])
                lists.add(block.get_submodule(path))
                block.get_submodule(path).observe_all.add(index)
        try:
            forward_block(block, inputs, batch, update=False)
        finally:
            for h in hooks:
                h.remove()
            for experts in lists:
                experts.observe_all.clear()
        return observers, tokens

    observers, tokens = one_pass(range(len(groups)), everything=False)
    least = block.get_submodule(groups[0][0]).in_features if min_tokens is None else min_tokens
    short = [i for i in tokens if tokens[i] < max(least, 1)]  # an expert no token reached, always
    routed = dict(tokens)
    if short:
        again, all_tokens = one_pass(short, everything=True)
        observers.update(again)
        tokens.update(all_tokens)
    return {n: (observers[i], {"tokens_routed": routed[i], "tokens_observed": tokens[i], "expert_fallback": i in short}
                if i in tokens else None) for i, g in enumerate(groups) for n in g}


def _solve_block(block: nn.Module, prefix: str, adapter: ArchAdapter, solver: Solver, targets: set[str],
                 inputs: BlockInputs | None, batch: int | None, compute_dtype: torch.dtype,
                 expert_min_tokens: int | None = None) -> dict:
    """Quantize one block's target linears group by group, then (calibrated) propagate the samples."""
    block_results, solved, held = {}, set(), 0
    tails = {f"{child}.{linear}" for child, (linear, _) in adapter.tails.items()}
    tail_inputs: dict[nn.Module, dict[str, list]] = {}  # per module (block, reference): tail linears' inputs
    reference = observed = None
    if inputs is not None and inputs.reference is not None:
        reference = copy.deepcopy(block)  # the block's float function, before anything is rounded
        if getattr(solver, "float_targets", False):
            observed = reference  # observers also get the float model's input of each linear
    try:
        for stage in _stages(adapter.sequential):
            if len(stage) > 1:  # experts: every group observed in one pass
                observed_by = _observe_experts(block, prefix, stage, solver, targets, inputs, batch,
                                               expert_min_tokens)
            else:
                names = [n for n in stage[0] if prefix + n in targets]
                observer = None
                if solver.calibrated and names:  # the group's linears read one input: observe it once
                    observer = solver.observer([prefix + n for n in names], [block.get_submodule(n) for n in names])
                if observer is not None:  # None: this solver needs no statistics for the group
                    held += _observe(block, observed, names, observer, tails, tail_inputs, inputs, batch)
                observed_by = {n: (observer, None) for n in names}
            for n, (observer, seen) in observed_by.items():
                linear = block.get_submodule(n)
                qw = solver.quantize(prefix + n, linear, observer)
                _write_back(linear, qw, compute_dtype)
                block_results[prefix + n] = qw.cpu()
                if seen is not None:
                    solver.report.setdefault(prefix + n, {}).update(seen)
            solved.update(n for group in stage for n in group)
            if solver.calibrated:
                for module in [m for m in (block, observed) if m is not None]:
                    _replay_finished(module, adapter, solved, tail_inputs.get(module, {}))
        if reference is not None:  # the float stream moves on first: its outputs are what tuning aims at
            forward_block(reference, BlockInputs(inputs.reference, inputs.kwargs, device=inputs.device), batch,
                          update=True)
        if getattr(solver, "tunes_blocks", False):
            _unreplay(block)
            tuned = solver.finish_block(block, prefix, inputs, inputs.reference, block_results)
            for name, qw in tuned.items():
                _write_back(block.get_submodule(name.removeprefix(prefix)), qw, compute_dtype)
                block_results[name] = qw.cpu()
        if solver.calibrated:
            forward_block(block, inputs, batch, update=True)
    finally:
        _unreplay(block)
        if held:
            inputs.budget.give(held)
    return block_results


def _unreplay(block: nn.Module) -> None:
    """Put back every child a Replay stood in for."""
    for name, child in list(block.named_children()):
        if isinstance(child, Replay):
            setattr(block, name, child.module)


def _streams(inputs: BlockInputs | None) -> dict[str, torch.Tensor]:
    """The runner state a resumed run needs: every hidden-state stream leaving the block."""
    if inputs is None:
        return {}
    return {"hidden": inputs.hidden, **({"reference": inputs.reference} if inputs.reference is not None else {})}


class Collected(dict):
    """The sink of an in-memory run: the quantized weights by linear name (tests, library use)."""

    def write_block(self, index: int, quantized: dict, floats: dict) -> None:
        self.update(quantized)


@torch.no_grad()  # nothing here needs autograd, and a graph behind a result keeps its float weight alive
def run_layers(model: nn.Module, adapter: ArchAdapter, solver: Solver, targets: set[str],
               samples: torch.Tensor | None = None, device: str | torch.device = "cpu",
               batch_tokens: int = BATCH_TOKENS, progress: bool = True, workdir=None, sink=None, checkpoint=None,
               budget=None, spill_dir=None, expert_min_tokens: int | None = None):
    """Quantize the linears named in `targets` (full names), block by block, and hand each finished block to
    `sink` (`write_block(index, quantized, floats)`: its QuantizedWeights on CPU, and its other parameters
    in the model's dtype). Returns the sink; by default a `Collected` dict of the quantized weights.

    With a `checkpoint` (models.checkpoint), `model` is its skeleton on the meta device: the embedding is
    read for the calibration inputs and each block right before it is solved, and both are released
    afterwards. Without one, `model` is in memory and its quantized weights are written back dequantized,
    so it behaves as the packed model will. With a `workdir` (resume.WorkDir), each finished block is
    recorded durably, and blocks already recorded there are handed to the sink instead of solved again.
    With a `budget` (memory.Budget), the calibration activations stay in memory only while they fit in it;
    otherwise they are memory-mapped files in `spill_dir`. An expert routed fewer than `expert_min_tokens`
    calibration tokens (None: its linears' input width) is observed on every token.
    """
    device = torch.device(device)
    sink = Collected() if sink is None else sink
    blocks = adapter.blocks(model)
    model_dtype = next(model.parameters()).dtype
    compute_dtype = torch.float32 if device.type == "cpu" else model_dtype
    done = workdir.resume_point(stateful=solver.calibrated) if workdir is not None else 0
    for index in range(done):
        quantized, report, floats = workdir.load(index)
        if checkpoint is None:  # the model in memory computes with what was recorded
            _restore(model, quantized, floats, compute_dtype)
        solver.report.update(report)
        sink.write_block(index, quantized, floats)
    inputs, batch = None, None
    if solver.calibrated and done < len(blocks):
        if samples is None:
            raise ValueError("this solver needs calibration samples")
        embedding = model.get_input_embeddings()
        if checkpoint is not None:
            checkpoint.materialize(embedding, prefix_of(model, embedding))
        streams = 1 + (getattr(solver, "float_targets", False) or getattr(solver, "tunes_blocks", False))
        allocate = budgeted_allocator(budget, spill_dir, streams) if budget else None
        inputs = capture_inputs(model, adapter, samples, device, compute_dtype, allocate)
        if checkpoint is not None:
            checkpoint.release(embedding)
        if streams > 1:
            inputs.reference, backing = (allocate or in_memory(device))("reference", inputs.hidden.shape,
                                                                         compute_dtype)
            inputs.reference.copy_(inputs.hidden)
            inputs.mapped += [backing] if backing is not None else []
        batch = max(1, batch_tokens // samples.shape[1])
        if budget is not None:
            inputs.budget = budget
            if progress:
                _say_where(inputs, allocate, adapter, model, streams)
        if done:
            with torch.inference_mode():  # the captured activations are inference tensors
                state = workdir.load_state(done - 1)
                for name, stream in _streams(inputs).items():
                    stream.copy_(state[name])
    run = _Run(adapter, solver, targets, inputs, batch, device, compute_dtype, model_dtype, workdir, sink, checkpoint,
               expert_min_tokens)
    with tqdm(total=len(blocks), desc="quantizing", unit="block", disable=not progress, initial=done) as bar:
        for index in range(done, len(blocks)):
            _quantize_block(blocks[index], index, run)
            bar.update()
    for stream in inputs.mapped if inputs is not None else []:
        stream.close()
    return sink


@dataclass
class _Run:
    """What every block of one run is solved with."""

    adapter: ArchAdapter
    solver: Solver
    targets: set[str]
    inputs: BlockInputs | None
    batch: int | None
    device: torch.device
    compute_dtype: torch.dtype
    model_dtype: torch.dtype
    workdir: object
    sink: object
    checkpoint: object
    expert_min_tokens: int | None = None


def _quantize_block(block: nn.Module, index: int, run: _Run) -> None:
    """Read (when streaming), solve, record and hand one decoder block to the sink, then release it."""
    prefix = run.adapter.block_prefix(index)
    if run.checkpoint is not None:
        run.checkpoint.materialize(block, prefix, run.device, run.compute_dtype)
    block.to(device=run.device, dtype=run.compute_dtype)
    if run.inputs is not None:
        run.inputs.at_block(index)
    with solving():
        if hasattr(run.solver, "prepare_block"):  # e.g. AWQ: search and fold scales before anything is rounded
            run.solver.prepare_block(block, prefix, run.inputs, run.batch)
        results = _solve_block(block, prefix, run.adapter.for_block(index), run.solver, run.targets, run.inputs,
                               run.batch, run.compute_dtype, run.expert_min_tokens)
    floats = {prefix + n: p.detach().to(device="cpu", dtype=run.model_dtype) for n, p in block.named_parameters()
              if not (n.endswith(".weight") and prefix + n.removesuffix(".weight") in results)}
    stored = block.state_dict(keep_vars=True)  # persistent buffers are checkpoint tensors too (DeepSeek's router bias)
    floats.update({prefix + n: b.detach().to(device="cpu", dtype=run.model_dtype) for n, b in block.named_buffers()
                   if n in stored})
    if run.checkpoint is None:  # the model in memory goes on in its own dtype
        block.to(device="cpu", dtype=run.model_dtype)
    if run.workdir is not None:
        run.workdir.save(index, results, {n: run.solver.report[n] for n in results if n in run.solver.report},
                         _streams(run.inputs), floats)
    run.sink.write_block(index, results, floats)
    if run.checkpoint is not None:
        run.checkpoint.release(block)


def _say_where(inputs: BlockInputs, allocate, adapter: ArchAdapter, model: nn.Module, streams: int) -> None:
    """One line on stderr: how much calibration data the run holds, and where."""
    per_token = inputs.hidden.element_size() * streams
    tokens = inputs.hidden.shape[0] * inputs.hidden.shape[1]
    block = adapter.blocks(model)[0]
    widths = sum(block.get_submodule(f"{child}.{tail}").in_features for child, (tail, _) in adapter.tails.items())
    line = (f"calibration activations: {tokens * inputs.hidden.shape[2] * per_token / 2**20:.0f} MiB, "
            f"{allocate.where}; up to {tokens * widths * per_token / 2**20:.0f} MiB more of linear inputs kept "
            f"within a block while --max-memory allows, to skip recomputing them")
    tqdm.write(line, file=sys.stderr)


def _restore(model: nn.Module, quantized: dict, floats: dict, compute_dtype: torch.dtype) -> None:
    """Put a recorded block back into the in-memory model: quantized weights dequantized, other parameters."""
    for name, qw in quantized.items():
        linear = model.get_submodule(name)
        dtype = linear.weight.dtype
        linear.to(compute_dtype)
        _write_back(linear, qw, compute_dtype)
        linear.to(dtype)
    for name, value in floats.items():
        model.get_parameter(name).copy_(value)
