"""The integer grid: fitting scales and zero points per group, and rounding onto them.

A weight W [out, in] is cut along its input dimension into groups of `group_size` columns
(the last group may be shorter: 576 = 4 x 128 + 64). Each (row, group) gets a scale s and an
integer zero z, and a weight is stored as a code q in [0, 2^bits - 1] with w ~ (q - z) * s.
Scales are rounded to float16 at fit time because every packed layout stores them so: the
weights the solvers see are exactly the weights a loader will rebuild.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """How one linear is quantized: bit width, grouping, symmetry and clip search."""

    bits: int = 4
    group_size: int = 128  # -1: one group per output row (per channel)
    sym: bool = False
    clip: str = "minmax"  # or "mse": shrink the range per group to minimise the rounding error
    min_zero: int = 0  # smallest zero point the target layout can store (gptq v1 stores z - 1)

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group size must be positive or -1 (per channel), got {self.group_size}")
        if self.clip not in ("minmax", "mse"):
            raise ValueError(f"clip must be 'minmax' or 'mse', got {self.clip!r}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)

    def width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


@dataclass
class QuantizedWeight:
    """A linear's weight on the grid: what every writer packs and every reader rebuilds.

    codes [out, in] uint8, scales [out, groups] float32 (float16-exact), zeros [out, groups]
    int32, g_idx [in] int32 (the group of each input column; act-order permutes it).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.g_idx.long()
        s = self.scales[:, g]
        z = self.zeros[:, g]
        return ((self.codes.to(torch.float32) - z) * s).to(dtype)

    def cpu(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes.cpu(), self.scales.cpu(), self.zeros.cpu(), self.g_idx.cpu(), self.bits,
                               self.group_size, self.sym)

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // group_size).to(torch.int32)


def _float16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value >= x (so a rounded scale never shrinks the range it must cover)."""
    info = torch.finfo(torch.float16)
    h = x.clamp(info.tiny, info.max).to(torch.float16)
    h = torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, info.max)), h)
    return h.float()


def fit_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero covering [xmin, xmax] (any shape, float32); zero lies inside the range.

    Every weight in the range lands within half a step of a grid point.
    """
    maxq = spec.maxq
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    scale = 2 * torch.maximum(-xmin, xmax) / maxq if spec.sym else (xmax - xmin) / maxq
    scale = _float16_ceil(torch.where(scale > 0, scale, torch.ones_like(scale)))  # all-zero group: any scale
    if spec.sym:
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    zero = torch.round(-xmin / scale)
    if spec.min_zero > 0:
        # the layout cannot store zeros below min_zero: widen the scale so the range still fits
        zero = zero.clamp_min(spec.min_zero)
        scale = _float16_ceil(torch.maximum(scale, torch.maximum(xmax / (maxq - zero).clamp_min(1), -xmin / zero)))
    return scale, zero.clamp(0, maxq)


def round_to_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes of x on the grid (scale, zero broadcast against x)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def fit_groups(x: torch.Tensor, spec: QuantSpec, max_shrink: float = 0.8, norm: float = 2.4,
               importance: torch.Tensor | None = None, fine: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of x [..., n], fitted over the last dimension.

    With clip="mse", each row's range is shrunk by the factor p in [1 - max_shrink, 1] with the lowest
    sum of importance * |error|^norm (norm 2.4 as in the GPTQ reference; `importance`, broadcast against
    x, e.g. the Hessian diagonal, weights each column). p is searched in steps of 0.05, then of 0.01
    around the best coarse step: a third of the candidates of a flat 0.01 grid, within 0.1% of its error.
    fine=False stops after the coarse steps (two thirds of the time: what pricing a setting needs).
    """
    x = x.float()
    xmin, xmax = x.amin(-1), x.amax(-1)
    scale, zero = fit_range(xmin, xmax, spec)
    if spec.clip == "minmax":
        return scale, zero
    weight = torch.ones(x.shape[-1], device=x.device) if importance is None else importance.float()
    best, best_p = _clip_error(x, scale, zero, spec, weight, norm), torch.ones_like(scale)
    centre = best_p
    steps = ((0.05, range(1, round(max_shrink / 0.05) + 1)), (0.01, (-4, -3, -2, -1, 1, 2, 3, 4)))
    for step, offsets in steps if fine else steps[:1]:
        for k in offsets:
            p = (centre - k * step).clamp(1 - max_shrink, 1)
            s, z = fit_range(p * xmin, p * xmax, spec)
            err = _clip_error(x, s, z, spec, weight, norm)
            better = err < best
            best, best_p = torch.where(better, err, best), torch.where(better, p, best_p)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
        centre = best_p
    return scale, zero


def _clip_error(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, weight: torch.Tensor,
                norm: float) -> torch.Tensor:
    """sum(weight * |dequantized - x|^norm) per row, computed on the grid's units: the row's scale
    factors out, and |d|^norm as exp(norm * log|d|) is twice as fast as pow on the CPU."""
    t = x / scale[..., None]
    d = torch.round(t).clamp_(-zero[..., None], spec.maxq - zero[..., None]).sub_(t).abs_()
    return d.log_().mul_(norm).exp_().mul_(weight).sum(-1) * scale ** norm


def fit(weight: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None,
        fine: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) scale and zero for a weight [out, in]; the last group may be shorter.
    importance [in]: weights each column's error in the clip search; fine: see fit_groups."""
    out_features, in_features = weight.shape
    width = spec.width(in_features)
    full = in_features // width * width
    parts = []
    if full:
        grouped = None if importance is None else importance[:full].reshape(-1, width)
        parts.append(fit_groups(weight[:, :full].reshape(out_features, -1, width), spec, importance=grouped,
                                fine=fine))
    if full < in_features:
        s, z = fit_groups(weight[:, full:], spec, importance=None if importance is None else importance[full:],
                          fine=fine)
        parts.append((s[:, None], z[:, None]))
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def quantize(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec,
             g_idx: torch.Tensor | None = None) -> QuantizedWeight:
    """Round a weight [out, in] onto given group parameters."""
    if g_idx is None:
        g_idx = default_g_idx(weight.shape[1], spec.group_size)
    g = g_idx.long()
    codes = round_to_grid(weight.float(), scales[:, g], zeros[:, g], spec.maxq)
    return QuantizedWeight(codes.to(torch.uint8), scales.float(), zeros.to(torch.int32), g_idx.to(torch.int32),
                           spec.bits, spec.group_size, spec.sym)
