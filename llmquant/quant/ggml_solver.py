"""Solvers whose grid is a GGUF block format (Q4_K, Q8_0, ...) instead of a per-group integer grid.

`reference` rounds as llama-quantize does without an importance matrix; `imatrix` weights each
column's error by the mean square of its calibration input, the statistic llama.cpp's imatrix
tool collects, gathered here by the runner from the partially quantized model; `gptq` rounds
column by column onto each block's grid with GPTQ's error feedback, fitting a block's
parameters (importance-weighted by the Hessian diagonal) when the solver reaches it.
"""

from __future__ import annotations

import time
import warnings

import torch
from gguf import GGMLQuantizationType
from torch import nn

from ..numerics.kld import solved_cost
from ..numerics.ggml import FLOAT, CODECS, BlockFormat, BlockTensor
from .ggml_affine import affine, level_bits
from .gptq import Hessian, HessianNotPositiveDefinite, _inverse_cholesky, _one_thread, prepare

MODES = ("reference", "imatrix", "gptq")


class SquareMean:
    """Per input column, the mean of x^2 over every calibration token (llama.cpp's imatrix entry)."""

    def __init__(self, columns: int, device):
        self.sum = torch.zeros(columns, device=device, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += (x * x).sum(0, dtype=torch.float64)
        self.tokens += x.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).float()


def gptq_blocks(weight: torch.Tensor, H: torch.Tensor, fmt: type[BlockFormat], damp: float = 0.01,
                max_damp: float = 1.0, C: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
    """GPTQ onto a block format: (encoded rows uint8 [out, in / block * type size], loss, damping used).
    C: see gptq.float_target."""
    W, H, factor = prepare(weight.float(), H.float(), None if C is None else C.float(), damp, max_damp)
    rows, cols = W.shape
    importance = torch.diag(H).clone()  # 2 E[x^2]: llama.cpp's imatrix, up to a factor
    U, used = factor or _inverse_cholesky(H, damp, max_damp)
    bits, size = level_bits(fmt.ggml_type.name), fmt.block_size
    lazy = max(size, 128 // size * size)  # a block's columns are all updated before it is fitted
    out = torch.empty(rows, cols // size, fmt.type_size, dtype=torch.uint8, device=W.device)
    loss = torch.zeros(rows, device=W.device)
    for i1 in range(0, cols, lazy):
        i2 = min(i1 + lazy, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err = torch.empty_like(W1)
        with _one_thread(W.device.type == "cpu"):
            for i in range(i2 - i1):
                j = (i1 + i) % size
                if j == 0:
                    raw = fmt.quantize(W1[:, i:i + size], importance[i1 + i:i1 + i + size])
                    a, b = affine(fmt, raw, bits)
                    a_safe = torch.where(a == 0, 1.0, a)
                    codes = torch.empty(rows, size, dtype=torch.long, device=W.device)
                w = W1[:, i]
                q = torch.clamp(torch.round((w - b[:, j]) / a_safe[:, j]), 0, bits.cmax)
                codes[:, j] = q.long()
                err[:, i] = (w - (a[:, j] * q + b[:, j])) / U1[i, i]
                W1[:, i + 1:].addr_(err[:, i], U1[i, i + 1:], alpha=-1)
                if j == size - 1:
                    out[:, (i1 + i) // size] = bits.with_codes(raw, codes)
        loss += err.pow(2).sum(1) / 2
        W[:, i2:].addmm_(err, U[i1:i2, i2:], alpha=-1)
    return out.reshape(rows, -1), float(loss.sum()), used


class BlockSolver:
    """Encodes each linear in its block type (`types`: full linear name -> type) in one of MODES."""

    def __init__(self, types: dict[str, GGMLQuantizationType], mode: str = "reference", damp: float = 0.01,
                 float_targets: bool = False, fisher: dict | None = None):
        self.types, self.mode, self.damp, self.fisher = types, mode, damp, fisher
        self.calibrated = mode != "reference"
        self.float_targets = float_targets and mode == "gptq"
        self.report: dict[str, dict] = {}

    def observer(self, names: list[str], linears: list[nn.Linear]) -> SquareMean | Hessian:
        device = linears[0].weight.device
        return Hessian(linears[0].in_features, device, cross=self.float_targets) if self.mode == "gptq" else \
            SquareMean(linears[0].in_features, device)

    def quantize(self, name: str, linear: nn.Linear, observer: SquareMean | Hessian | None) -> BlockTensor:
        start = time.perf_counter()
        kind = self.types[name]
        fmt = CODECS[kind.name]
        entry: dict = {"type": kind.name}
        data = None
        if self.mode == "gptq" and kind not in FLOAT and observer.n:
            try:
                data, entry["loss"], entry["damp"] = gptq_blocks(linear.weight, observer.H, fmt, self.damp,
                                                                 C=observer.C)
            except HessianNotPositiveDefinite as err:
                warnings.warn(f"{name}: {err}; encoded without GPTQ instead")
                entry["fallback"] = f"imatrix: {err}"
        if data is None:
            importance = None
            if isinstance(observer, SquareMean) and observer.tokens:
                importance = observer.value
            elif isinstance(observer, Hessian) and observer.n:
                importance = torch.diag(observer.H)
            data = fmt.quantize(linear.weight.float(), importance)
        entry["seconds"] = time.perf_counter() - start
        result = BlockTensor(kind, data, linear.in_features)
        entry.update(solved_cost(name, linear.weight, result, observer, self.fisher))
        self.report[name] = entry
        return result
