"""Round to nearest: the baseline every calibrated solver is measured against."""

from __future__ import annotations

import torch

from ..numerics.grid import QuantizedWeight, QuantSpec, fit, quantize


def rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    scales, zeros = fit(weight, spec)
    return quantize(weight, scales, zeros, spec)


class RTNSolver:
    """The runner's RTN solver: needs no calibration, so the runner makes no forward passes."""

    calibrated = False

    def __init__(self, spec: QuantSpec, overrides: dict[str, QuantSpec] | None = None):
        self.spec, self.overrides = spec, overrides or {}  # overrides: linear -> its own spec
        self.report: dict[str, dict] = {}

    def observer(self, names, linears):
        raise NotImplementedError("RTN observes nothing")

    def quantize(self, name, linear, observer) -> QuantizedWeight:
        return rtn(linear.weight, self.overrides.get(name, self.spec))
