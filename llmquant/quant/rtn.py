"""Round to nearest: the baseline every calibrated solver is measured against."""

from __future__ import annotations

import torch

from .grid import QuantizedWeight, QuantSpec, fit, quantize


def rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    scales, zeros = fit(weight, spec)
    return quantize(weight, scales, zeros, spec)
