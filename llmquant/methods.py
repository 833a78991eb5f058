"""The quantization methods, registered in one place: which solver each `--method` runs with its settings."""

from __future__ import annotations

from .config import AWQ_JUDGES, QuantConfig
from .quant.awq import AWQSolver
from .quant.gptq import GPTQSolver
from .numerics.grid import QuantSpec
from .quant.rtn import RTNSolver
from .quant.tune import TuneSpec


def make_solver(config: QuantConfig, spec: QuantSpec, scaling_pairs=(), targets: set[str] | None = None,
                inner=None, overrides: dict[str, QuantSpec] | None = None, fisher: dict | None = None):
    """The runner's solver for config.method; AWQ needs the family's scaling pairs (or the adapter's `pairs_at`,
    which gives each block's) and the linears quantized.
    `inner` replaces the solver AWQ hands its scaled weights to (a GGUF file passes its block encoder);
    `overrides` gives linears their own grid and `fisher` their outputs' sensitivity (mixed precision)."""
    if inner is not None:
        solver = inner
    elif config.method.endswith("gptq"):
        solver = GPTQSolver(spec, config.block_size, config.damp, *config.gptq_order(),
                            float_targets=config.float_targets, refit=config.refit_scales,
                            tune=TuneSpec(config.tune_iters, config.tune_samples), seed=config.seed,
                            overrides=overrides, fisher=fisher)
    else:
        solver = RTNSolver(spec, overrides)
    if config.method.startswith("awq"):
        solver = AWQSolver(solver, spec, scaling_pairs, targets, duo_scaling=config.duo_scaling,
                           clip=config.awq_clip_mode(), judge=AWQ_JUDGES[config.awq_search_mode()],
                           overrides=overrides)
    return solver
