"""GPTQ: round one input column at a time and push each rounding error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

`Hessian` accumulates H = 2/n sum x x^T from the runner's hooks; `gptq` solves one linear.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
import zlib
from dataclasses import dataclass

import torch

from ..numerics.grid import QuantizedWeight, QuantSpec, fit, fit_groups
from ..numerics.kld import solved_cost
from .rtn import rtn
from .tune import TuneSpec, tune_block

log = logging.getLogger(__name__)


class Hessian:
    """Running H = 2/n sum x x^T over every token the layer saw, in float32 (or float64).

    With `cross`, also C = 2/n sum (x_float - x) x^T, where x_float is the float model's input for the
    same token: how far the quantized model's inputs have drifted, which `float_target` corrects for."""

    def __init__(self, columns: int, device, dtype: torch.dtype = torch.float32, cross: bool = False):
        self.H = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.C = torch.zeros_like(self.H) if cross else None
        self.n = 0

    def add(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.dtype)
        m = x.shape[0]
        if m == 0:
            return
        keep = self.n / (self.n + m)
        self.n += m
        scale = math.sqrt(2 / self.n)
        if self.C is not None:
            drift = reference.reshape(x.shape).to(self.H.dtype) - x
            self.C.mul_(keep).addmm_(drift.T * scale, x * scale)
        x = x * scale
        self.H.mul_(keep).addmm_(x.T, x)


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    loss: float  # sum over the weight of (w - q)^2 / [H^-1]_jj^2 / 2: the layer-output error GPTQ minimises
    damp: float  # damping finally used (a fraction of the mean diagonal)
    unrounded: torch.Tensor  # [out, in] each code before rounding (the error-compensated weight / scale + zero)


@contextlib.contextmanager
def _one_thread(enabled: bool):
    """Single-threaded BLAS for the per-column steps on the CPU: at these sizes thread start-up costs more
    than it saves (and under load far more). The block-level matmuls run with every core."""
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class HessianNotPositiveDefinite(Exception):
    pass


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I: the Hessian GPTQ actually solves with (one new matrix, no identity)."""
    out = H.clone()
    out.diagonal().add_(damp * torch.mean(torch.diag(H)))
    return out


def _inverse_cholesky(H: torch.Tensor, damp: float, max_damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1 after damping; the damping grows tenfold until it factors.
    One thread on the CPU: at layer widths LAPACK's threaded cholesky_inverse is many times slower."""
    with _one_thread(H.device.type == "cpu"):
        while damp <= max_damp:
            L, info = torch.linalg.cholesky_ex(damped(H, damp))
            if info == 0:
                Hinv = torch.cholesky_inverse(L)
                del L  # at 13B widths each of these matrices is 0.7 GiB: hold two at a time, not three
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if info == 0:
                    return U, damp
            log.info("Cholesky failed at damping %.3g; retrying at %.3g", damp, damp * 10)
            damp *= 10
    raise HessianNotPositiveDefinite(f"H stays indefinite up to damping {max_damp}")


def prepare(weight: torch.Tensor, H: torch.Tensor, C: torch.Tensor | None, damp: float,
            max_damp: float) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, float] | None]:
    """(W, H, factor) ready to solve: W a copy, H with dead inputs (never seen) given a unit diagonal so no
    error feeds back through them, and W moved to its float target when C is given. factor is
    _inverse_cholesky(H) where the target needed it (the solver reuses it), else None."""
    W = weight.detach().to(H.dtype).clone()
    dead = torch.diag(H) == 0
    if dead.any():  # H is the observer's, shared by the group's linears: change a copy
        H = H.clone()
        H[dead, dead] = 1
    if C is None:
        return W, H, None
    factor = _inverse_cholesky(H, damp, max_damp)
    return float_target(W, C, factor[0]), H, factor


def float_target(W: torch.Tensor, C: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """W + W C H^-1 (U: upper Cholesky factor of the damped H^-1): the least-squares weight for inputs x
    whose outputs should be the float layer's on the float model's inputs, argmin_V sum ||V x - W x_float||^2
    (GPTAQ's asymmetric calibration, Li et al., 2025). Rounding it with GPTQ on H then minimises that
    distance, not ||(W - Q) x||^2: the error earlier layers left in x is compensated instead of preserved."""
    return W + (W @ C) @ U.T @ U


def refit_scales(qw: QuantizedWeight, weight: torch.Tensor, H: torch.Tensor) -> tuple[QuantizedWeight, float]:
    """(qw with better scales, its loss). For the codes and zeros GPTQ chose, the layer-output error
    tr((W - Q) H (W - Q)^T) / 2 is quadratic in each row's group scales: solve that small least-squares
    problem per row. A row keeps its scales unless the solution, rounded to float16, lowers its error."""
    g = qw.g_idx.long()
    rows, groups = qw.scales.shape
    W = weight.to(H.dtype)
    base = qw.codes.to(H.dtype) - qw.zeros[:, g].to(H.dtype)  # Q = base * scales[:, g]
    A = torch.zeros(rows, groups, groups, dtype=H.dtype, device=H.device)
    b = torch.zeros(rows, groups, dtype=H.dtype, device=H.device)
    for a in range(groups):
        cols = torch.nonzero(g == a).flatten()
        Y = base[:, cols] @ H[cols]  # [rows, in]: this group's part of Q H, per unit scale
        A[:, a].index_add_(1, g, Y * base)
        b[:, a] = (Y * W).sum(1)
    const = ((W @ H) * W).sum(1)
    empty = torch.diagonal(A, dim1=1, dim2=2) == 0  # a group whose codes are all at the zero point
    old = qw.scales.to(H.dtype)
    torch.diagonal(A, dim1=1, dim2=2)[empty] = 1
    b[empty] = old[empty]
    new = torch.linalg.solve(A, b).to(torch.float16).to(H.dtype)  # the layout stores float16 scales

    def error(s):
        return const - 2 * (b * s).sum(1) + (s[:, None, :] @ A @ s[:, :, None]).flatten()

    new = torch.where(torch.isfinite(new) & (new > 0), new, old)  # for an empty group both errors agree
    better = (error(new) < error(old))[:, None]
    scales = torch.where(better, new, old)
    refit = QuantizedWeight(qw.codes, scales.float(), qw.zeros, qw.g_idx, qw.bits, qw.group_size, qw.sym)
    return refit, float(error(scales).sum()) / 2


def gptq(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec, block_size: int = 128, damp: float = 0.01,
         max_damp: float = 1.0, act_order: bool = False, static_groups: bool = False,
         C: torch.Tensor | None = None, refit: bool = False) -> GPTQResult:
    """Quantize weight [out, in] given the Hessian [in, in] of its inputs (and C: see float_target).

    act_order solves columns by decreasing H diagonal. Groups are then consecutive in solve order
    (g_idx is permuted) unless static_groups, which fits every group's parameters on the original
    columns before solving, so the checkpoint keeps g_idx = i // group_size. refit: see refit_scales.
    """
    W, H, factor = prepare(weight, H, C, damp, max_damp)
    target, H_target = (W.clone(), H) if refit else (None, None)  # original column order
    rows, cols = W.shape
    g = spec.width(cols)
    importance = torch.diag(H).float()  # the clip search weighs each column's error as GPTQ's loss does
    if spec.group_size == -1 or static_groups:
        scales, zeros = fit(W.float(), spec, importance)  # [rows, groups] on the original column order
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H, factor = W[:, perm], H[perm[:, None], perm], None  # the permuted H needs its own factor
        importance = importance[perm]
    U, used_damp = factor or _inverse_cholesky(H, damp, max_damp)
    H = factor = None  # only U is needed from here (refit uses H_target): one matrix fewer while solving
    if spec.group_size != -1:
        block_size = max(g, block_size // g * g)  # groups never straddle a block: fit on updated weights
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    unrounded = torch.empty(rows, cols, dtype=torch.float32, device=W.device)
    losses = torch.zeros(rows, device=W.device, dtype=U.dtype)
    fitted_s, fitted_z = [], []
    col_group = torch.arange(cols, device=W.device) // g if spec.group_size != -1 else \
        torch.zeros(cols, dtype=torch.long, device=W.device)
    if perm is not None and (static_groups or spec.group_size == -1):
        col_group = col_group[perm] if spec.group_size != -1 else col_group  # original group of each solved col
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        u1 = torch.empty_like(W1)
        err = torch.empty_like(W1)
        with _one_thread(W.device.type == "cpu"):
            for i in range(i2 - i1):
                c = i1 + i
                if spec.group_size != -1 and not static_groups and c % g == 0:
                    scale, zero = (t.to(W1.dtype) for t in fit_groups(W1[:, i:i + g].float(), spec,
                                                                        importance=importance[c:c + g]))
                    fitted_s.append(scale)
                    fitted_z.append(zero)
                elif spec.group_size == -1 or static_groups:
                    scale, zero = scales[:, col_group[c]].to(W1.dtype), zeros[:, col_group[c]].to(W1.dtype)
                w = W1[:, i]
                u = torch.div(w, scale, out=u1[:, i]).add_(zero)
                q = torch.round(u).clamp_(0, spec.maxq)
                e = err[:, i]
                torch.div(w - (q - zero) * scale, U1[i, i], out=e)
                W1[:, i + 1:].addr_(e, U1[i, i + 1:], alpha=-1)
        unrounded[:, i1:i2] = u1
        codes[:, i1:i2] = u1.round().clamp_(0, spec.maxq).to(torch.uint8)
        losses += err.pow(2).sum(1) / 2
        W[:, i2:].addmm_(err, U[i1:i2, i2:], alpha=-1)
    if spec.group_size != -1 and not static_groups:
        scales, zeros = torch.stack(fitted_s, 1), torch.stack(fitted_z, 1)
        solve_group = torch.arange(cols, device=W.device) // g  # group of each solved column
    else:
        solve_group = col_group
    g_idx = torch.empty(cols, dtype=torch.int32, device=W.device)
    if perm is not None:
        inv = torch.argsort(perm)
        codes, unrounded = codes[:, inv], unrounded[:, inv]
        g_idx[:] = solve_group[inv].to(torch.int32)
    else:
        g_idx[:] = solve_group.to(torch.int32)
    qw = QuantizedWeight(codes, scales.float(), zeros.to(torch.int32), g_idx, spec.bits, spec.group_size, spec.sym)
    loss = float(losses.sum())
    if refit:  # on the damped H: the objective the column updates minimised
        U = None
        qw, loss = refit_scales(qw, target, damped(H_target, used_damp))
    return GPTQResult(qw, loss, used_damp, unrounded)


class GPTQSolver:
    """The runner's GPTQ solver: one Hessian per input-sharing group; RTN where GPTQ cannot run."""

    calibrated = True

    def __init__(self, spec: QuantSpec, block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                 static_groups: bool = False, float_targets: bool = False, refit: bool = False,
                 tune: TuneSpec = TuneSpec(), seed: int = 0, overrides: dict[str, QuantSpec] | None = None,
                 fisher: dict | None = None):
        self.spec, self.block_size, self.damp = spec, block_size, damp
        self.overrides = overrides or {}  # linear -> its own spec (mixed precision)
        self.fisher = fisher  # linear -> F of its outputs (sensitivity.py): the report gives each result's cost
        self.act_order, self.static_groups = act_order, static_groups
        self.float_targets, self.refit = float_targets, refit
        self.tune, self.seed, self.tunes_blocks = tune, seed, tune.iters > 0
        self.report: dict[str, dict] = {}
        self._unrounded: dict[str, torch.Tensor] = {}  # per linear of the current block, for finish_block

    def observer(self, names, linears) -> Hessian:
        return Hessian(linears[0].in_features, linears[0].weight.device, cross=self.float_targets)

    def output_error(self, weight: torch.Tensor, gram: torch.Tensor, name: str = "") -> float:
        """E||(W - Q) x||^2 this solver's Q leaves for inputs with Gram matrix `gram` = E[x x^T] (GPTQ's loss on
        H = 2 gram) on the grid of linear `name`; infinite where GPTQ cannot run. How AWQ judges scales for GPTQ
        (see AWQSolver)."""
        try:
            return gptq(weight, 2 * gram, self.overrides.get(name, self.spec), self.block_size, self.damp, act_order=self.act_order,
                        static_groups=self.static_groups, refit=self.refit).loss
        except HessianNotPositiveDefinite:
            return math.inf

    def quantize(self, name: str, linear, observer: Hessian) -> QuantizedWeight:
        start = time.perf_counter()
        spec = self.overrides.get(name, self.spec)
        entry: dict = {"tokens": observer.n}
        reason = None if observer.n else "saw no calibration tokens"
        if reason is None:
            try:
                result = gptq(linear.weight, observer.H, spec, self.block_size, self.damp,
                              act_order=self.act_order, static_groups=self.static_groups, C=observer.C,
                              refit=self.refit)
                qw = result.weight
                entry.update(loss=result.loss, damp=result.damp)
                if self.tunes_blocks:
                    self._unrounded[name] = result.unrounded
            except HessianNotPositiveDefinite as err:
                reason = str(err)
        if reason is not None:
            warnings.warn(f"{name}: {reason}; quantized with RTN instead")
            qw = rtn(linear.weight, spec)
            entry["fallback"] = f"rtn: {reason}"
        entry["seconds"] = time.perf_counter() - start
        entry.update(solved_cost(name, linear.weight, qw, observer, self.fisher))
        self.report[name] = entry
        return qw

    def finish_block(self, block, prefix: str, inputs, targets: torch.Tensor,
                     results: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
        """The block's GPTQ results tuned against the float block's outputs (see tune.py); RTN fallbacks stay."""
        start = time.perf_counter()
        weights = {n.removeprefix(prefix): (results[n], self._unrounded.pop(n)) for n in list(self._unrounded)}
        if not weights:
            return {}
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(prefix.encode()))
        tuned, figures = tune_block(block, inputs.hidden, targets, inputs.kwargs, weights, self.tune, generator)
        seconds = (time.perf_counter() - start) / max(len(tuned), 1)
        for n in tuned:
            self.report[prefix + n].update(figures, tune_seconds=seconds)
        return {prefix + n: qw for n, qw in tuned.items()}
