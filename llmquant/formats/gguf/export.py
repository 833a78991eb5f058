"""Quantize a float checkpoint into one GGUF file: mix -> per-tensor types -> runner -> writer."""

from __future__ import annotations

import time
from pathlib import Path

from ...errors import UserError
from ..atomic import check_destination
from .mixes import MIXES, TensorInfo, parse_overrides, tensor_types
from .quants import FORMATS
from .writer import (
    PERMUTED,
    Tensor,
    arch_of,
    gguf_name,
    heads_of,
    permute_rows,
    write_gguf,
)

GGUF_METHODS = ("rtn", "imatrix", "gptq", "awq")
MODE = {"rtn": "reference", "imatrix": "imatrix", "gptq": "gptq", "awq": "reference"}


def export_gguf(model, config, out: Path, force: bool = False, progress: bool = True, work_dir=None,
                resume: bool = False) -> dict:
    """Returns figures for the report: seconds, size_bytes, bpw, types (GGUF name -> type name).
    With `work_dir`, finished blocks are kept durably and `resume` continues such a run."""
    from ...api import calibration_samples, make_solver, open_workdir
    from ...models.loader import load_float_model
    from ...quant.blocks import BlockSolver
    from ...runner import run_layers

    if config.method not in GGUF_METHODS:
        raise UserError(f"--format gguf takes --method {', '.join(GGUF_METHODS)}, not {config.method}")
    if config.gguf_type not in MIXES:
        raise UserError(f"unknown --gguf-type '{config.gguf_type}'; choose one of {', '.join(MIXES)}")
    overrides = parse_overrides(config.tensor_types)
    out = Path(out)
    check_destination(out, force, directory=False)
    start = time.perf_counter()
    float_model, tokenizer, adapter, source = load_float_model(model)
    cfg = float_model.config
    arch = arch_of(cfg.model_type)
    n_blocks = cfg.num_hidden_layers
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    state = float_model.state_dict()
    names = {hf: gguf_name(hf, arch, n_blocks) for hf in state if not (tied and hf == "lm_head.weight")}
    infos = [TensorInfo(g, tuple(state[hf].shape)) for hf, g in names.items()]
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    types = tensor_types(infos, config.gguf_type, cfg.num_attention_heads // n_kv, tied,
                         has_imatrix=config.method != "rtn", overrides=overrides)

    linear_types = {}
    for index in range(n_blocks):
        for linear in adapter.linears():
            full = adapter.block_prefix(index) + linear
            linear_types[full] = types[names[full + ".weight"]]
    solver = BlockSolver(linear_types, MODE[config.method], config.damp, config.float_targets)
    if config.method == "awq":  # AWQ's search and fold on the integer grid, then the block encoders
        solver = make_solver(config, config.spec(), adapter.scaling_pairs, set(linear_types), inner=solver)
    samples = calibration_samples(config, float_model, tokenizer) if solver.calibrated else None
    workdir = open_workdir(work_dir, resume, source, samples, config)
    encoded = run_layers(float_model, adapter, solver, set(linear_types), samples, config.device, progress=progress,
                         workdir=workdir)

    state = float_model.state_dict()  # AWQ folded its scales into norms
    tensors = []
    for hf, g in names.items():
        kind = types[g]
        module = hf.removesuffix(".weight")
        data = encoded[module].data if module in encoded else FORMATS[kind.name].quantize(state[hf].float())
        heads = heads_of(hf, cfg)
        if heads is not None and arch in PERMUTED:
            data = permute_rows(data, heads)
        tensors.append(Tensor(g, kind, data.contiguous().numpy()))
    params = sum(state[hf].numel() for hf in names)
    write_gguf(out, arch, cfg, source, tokenizer, tensors, MIXES[config.gguf_type][0], params, force=force)
    weight_bytes = sum(t.data.nbytes for t in tensors)
    return {"seconds": time.perf_counter() - start, "size_bytes": out.stat().st_size, "bpw": 8 * weight_bytes / params,
            "types": {g: t.name for g, t in types.items()}, "linears": len(encoded)}

