"""Solvers whose grid is a GGUF block format (Q4_K, Q8_0, ...) instead of a per-group integer grid.

`reference` rounds as llama-quantize does without an importance matrix; `imatrix` weights each
column's error by the mean square of its calibration input, the statistic llama.cpp's imatrix
tool collects, gathered here by the runner from the partially quantized model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType
from torch import nn

from ..formats.gguf.quants import FORMATS


@dataclass
class BlockTensor:
    """A weight encoded in a block format: rows of bytes exactly as the GGUF file stores them."""

    type: GGMLQuantizationType
    data: torch.Tensor  # uint8 [out, in / block size * type size]
    in_features: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return FORMATS[self.type.name].dequantize(self.data, self.in_features).to(dtype)

    def cpu(self) -> BlockTensor:
        return BlockTensor(self.type, self.data.cpu(), self.in_features)


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


class BlockSolver:
    """Encodes each linear in its block type (`types`: full linear name -> type), optionally weighting
    the fit by the linear's input statistics."""

    def __init__(self, types: dict[str, GGMLQuantizationType], importance: bool):
        self.types = types
        self.calibrated = importance
        self.report: dict[str, dict] = {}

    def observer(self, names: list[str], linears: list[nn.Linear]) -> SquareMean:
        return SquareMean(linears[0].in_features, linears[0].weight.device)

    def quantize(self, name: str, linear: nn.Linear, observer: SquareMean | None) -> BlockTensor:
        kind = self.types[name]
        importance = observer.value if observer is not None and observer.tokens else None
        data = FORMATS[kind.name].quantize(linear.weight.float(), importance)
        return BlockTensor(kind, data, linear.in_features)
