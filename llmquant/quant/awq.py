"""AWQ: activation-aware weight quantization (Lin et al., 2023).

Input channels that carry large activations matter most, so before rounding each scaling group
(the linears reading one op's output) gets its input columns multiplied by s, and the previous op's
output is divided by s: the float block computes the same function, but the salient columns now
sit on a finer part of the grid. s = mean|x|^alpha (optionally / weight-magnitude^(1 - alpha)),
with alpha searched on a grid. Then each group's weight range is shrunk where that lowers the
output error, and an inner solver (RTN or GPTQ) quantizes the transformed block. A candidate s is
judged by the error min-max RTN would leave in the group's linear outputs, by the error the inner GPTQ
itself leaves (GPTQ corrects much of what scaling is for, so RTN's judge over-scales for it), or by
what RTN of the group does to the whole block's output on a few calibration windows (BlockJudge).

The linear-output errors are E||(W - Q(W)) x||^2 = tr(D G D^T) with G = E[x x^T], the Gram matrix of
the calibration inputs: exact for the tokens G was built from, and costs in^2 per row instead of
one matmul over every cached token per candidate (so no activations are kept for the search).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from ..errors import UserError
from ..models.adapters import LAST_OF_2, LAST_OF_3, OFFSET, SCALE
from ..activations import BlockInputs, forward_block
from .gptq import Hessian, _one_thread
from ..numerics.grid import QuantizedWeight, QuantSpec, fit_range, round_to_grid

# attention logits are products q.k: a per-output error of each alone misjudges clipping (AutoAWQ skips them too)
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


class InputStats:
    """What the search needs of one scaling group's input: per-channel mean |x| over every token, and
    G = E[x x^T] over every `stride`-th token (the Gram is the costly part)."""

    def __init__(self, columns: int, device, stride: int = 1):
        self.abs_sum = torch.zeros(columns, device=device, dtype=torch.float64)
        self.tokens = 0
        self.hessian = Hessian(columns, device)  # 2 E[x x^T]
        self.stride = stride

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.tokens += x.shape[0]
        self.hessian.add(x[::self.stride])

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    @property
    def gram(self) -> torch.Tensor:
        return self.hessian.H / 2


def _grouped(weight: torch.Tensor, width: int) -> torch.Tensor:
    """weight [out, in] as [out, groups, width]. A short last group is padded with zero columns, which
    change neither its fitted range (a range always contains 0) nor any output (0 rounds to 0)."""
    out_f, in_f = weight.shape
    return torch.nn.functional.pad(weight.float(), (0, -in_f % width)).view(out_f, -1, width)


def fake_quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """What RTN with min-max ranges rebuilds from `weight` (rtn(weight, spec).dequantize(), without the
    gathers of the general, g_idx-driven path)."""
    w = _grouped(weight, spec.width(weight.shape[1]))
    scale, zero = fit_range(w.amin(-1), w.amax(-1), spec)
    scale, zero = scale[..., None], zero[..., None]
    q = (round_to_grid(w, scale, zero, spec.maxq) - zero) * scale
    return q.flatten(1)[:, :weight.shape[1]]


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """E||(weight - approx) x||^2 summed over output rows, for inputs with Gram matrix `gram`."""
    d = (approx - weight).float()
    return float(((d @ gram) * d).sum())


def weight_magnitude(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per input channel: mean over rows of |w| relative to the largest |w| of its (row, group)."""
    w = _grouped(weight.abs(), group_size if group_size != -1 else weight.shape[1])
    return (w / (w.amax(-1, keepdim=True) + 1e-6)).flatten(1)[:, :weight.shape[1]].mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """s = x^alpha (/ w^(1-alpha) with duo scaling), normalised so that max(s) * min(s) = 1."""
    s = x_mean.clamp_min(1e-4).pow(alpha)
    if w_mean is not None:
        s = (s / (w_mean.pow(1 - alpha) + 1e-4)).clamp_min(1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


# the error left by rounding weight W [out, in] scaled by s [in] (folded back), for inputs with Gram matrix gram
ScaledError = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]


def rtn_error(spec: QuantSpec) -> ScaledError:
    """AWQ's judge: min-max RTN of W diag(s), folded back, W_q = Q(W diag(s)) diag(1/s)."""
    def error(weight, s, gram):
        with _one_thread(weight.device.type == "cpu"):  # small ops: thread start-up costs more than it saves
            return output_error(weight, fake_quantize(weight * s, spec) / s, gram)
    return error


class BlockJudge:
    """AWQ's module-output judge: a candidate's error is the mean squared difference between the block's
    output with only the group's linears rounded (min-max RTN of W diag(s), folded back) and the float
    block's, on `tokens` calibration tokens (whole windows, evenly spread). It sees what the Gram judge
    leaves out (softmax, the gate, the layers after the group), for one block forward per candidate."""

    def __init__(self, block: nn.Module, inputs: BlockInputs, batch: int, tokens: int):
        n, seqlen = inputs.hidden.shape[:2]
        count = min(n, math.ceil(tokens / seqlen))
        self.block, self.batch = block, batch
        self.hidden, self.kwargs = inputs.batch(inputs.hidden, torch.arange(count) * (n // count)), inputs.kwargs
        self.target = self._output()

    def _output(self) -> torch.Tensor:
        out = BlockInputs(self.hidden.clone(), self.kwargs)
        forward_block(self.block, out, self.batch, update=True)
        return out.hidden.float()

    def error(self, linears: list[nn.Linear], spec: QuantSpec) -> ScaledError:
        """The judge of one group; `weight` is its linears' weights concatenated, in order."""
        saved = [linear.weight.detach().clone() for linear in linears]  # restored after every candidate

        @torch.no_grad()
        def error(weight, s, gram):
            rounded = (fake_quantize(weight * s, spec) / s).split([linear.out_features for linear in linears])
            try:
                for linear, w in zip(linears, rounded):
                    linear.weight.copy_(w)
                return float((self._output() - self.target).pow(2).mean())
            finally:
                for linear, w in zip(linears, saved):
                    linear.weight.copy_(w)
        return error


def search_scale(weight: torch.Tensor, gram: torch.Tensor, x_mean: torch.Tensor, spec: QuantSpec,
                 n_grid: int = 20, duo_scaling: bool = True, error: ScaledError | None = None,
                 patience: int | None = None) -> dict:
    """The s minimising the output error of the rows of `weight` (a group's linears, concatenated) under
    `error` (default rtn_error). No scaling (s = 1) is always a candidate, so the result is never worse
    than plain rounding on these inputs. alpha = 0, 1/n_grid, ... is scanned upwards; with `patience`, the
    scan stops once the error has risen `patience` times in a row (it is past the minimum: the error is
    unimodal in alpha in practice), which matters when each candidate costs a GPTQ solve."""
    weight = weight.float()
    error = error or rtn_error(spec)
    w_mean = weight_magnitude(weight, spec.group_size) if duo_scaling else None
    identity = error(weight, torch.ones_like(x_mean), gram)
    best = {"alpha": None, "scales": torch.ones_like(x_mean), "error": identity, "error_identity": identity}
    previous, rises = math.inf, 0
    for i in range(n_grid):
        alpha = i / n_grid
        s = candidate_scales(x_mean, w_mean, alpha)
        candidate = error(weight, s, gram)
        if candidate < best["error"]:
            best.update(alpha=alpha, scales=s, error=candidate)
        rises = rises + 1 if candidate > previous else 0
        previous = candidate
        if patience is not None and rises >= patience:
            break
    return best


def _diagonal_blocks(gram: torch.Tensor, width: int) -> torch.Tensor:
    """The [groups, width, width] diagonal blocks of gram, zero-padded like _grouped pads the weight."""
    pad = -gram.shape[0] % width
    g = torch.nn.functional.pad(gram, (0, pad, 0, pad))
    groups = g.shape[0] // width
    return torch.diagonal(g.view(groups, width, groups, width), dim1=0, dim2=2).permute(2, 0, 1)


def search_clip(weight: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, n_grid: int = 20,
                max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) clamp of the weight range minimising that group's share of the output error;
    returns (clamped weight, fraction of each group's range kept [out, groups]). Groups are judged
    independently (cross-group terms of the Gram are left out), as in AWQ.

    Each end is shrunk by its own factor (1, 1 - 1/n_grid, ... down to 1 - max_shrink) on an
    asymmetric grid, so an outlier on one side costs the other side nothing (on the demo at W3 g64 this
    lowered every block's output error, by 10% at the median, against shrinking both ends by one
    factor). A symmetric grid shrinks both ends alike."""
    in_f = weight.shape[1]
    w, blocks = _grouped(weight, spec.width(in_f)), _diagonal_blocks(gram, spec.width(in_f))
    wmin, wmax = w.amin(-1), w.amax(-1)
    if spec.sym:
        wmax = torch.maximum(-wmin, wmax)
        wmin = -wmax
    factors = [1 - i / n_grid for i in range(int(max_shrink * n_grid))]
    pairs = [(p, p) for p in factors] if spec.sym else [(a, b) for a in factors for b in factors]
    best_err = torch.full_like(wmin, float("inf"))
    best_lo, best_hi = wmin, wmax
    with _one_thread(weight.device.type == "cpu"):
        for a, b in pairs:
            lo, hi = a * wmin, b * wmax
            scale, zero = (t[..., None] for t in fit_range(lo, hi, spec))
            clamped = torch.maximum(torch.minimum(w, hi[..., None]), lo[..., None])
            d = ((round_to_grid(clamped, scale, zero, spec.maxq) - zero) * scale - w).transpose(0, 1)
            err = (torch.bmm(d, blocks) * d).sum(-1).T  # [out, groups]: each group's share of the error
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    clamped = torch.maximum(torch.minimum(w, best_hi[..., None]), best_lo[..., None]).flatten(1)[:, :in_f]
    span = wmax - wmin
    kept = (torch.minimum(best_hi, wmax) - torch.maximum(best_lo, wmin)) / torch.where(span > 0, span, 1)
    return clamped.to(weight.dtype), kept


def _is_norm(module: nn.Module) -> bool:
    """A norm with one weight per channel (RMSNorm of every family, LayerNorm); how it applies the weight is
    the adapter's to say (ScalingPair.fold)."""
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith("RMSNorm")


def can_fold(previous: nn.Module, channels: int, fold: str = SCALE) -> bool:
    """Whether `previous` has one output channel per input channel of the group (GQA's v_proj -> o_proj
    has not: o_proj reads each v head several times; a fused linear, one in each of its parts)."""
    if isinstance(previous, nn.Linear):
        parts = {LAST_OF_2: 2, LAST_OF_3: 3}.get(fold, 1)
        return previous.out_features == parts * channels
    return (fold in (SCALE, OFFSET) and _is_norm(previous) and previous.weight is not None
            and previous.weight.shape == (channels,))


@torch.no_grad()
def fold_scales(block: nn.Module, previous: str, linears: list[str], scales: torch.Tensor, fold: str = SCALE) -> None:
    """Divide the output of `previous` by s and multiply the input columns of `linears` by s: the block
    computes the same function, with the scaled columns now in the weights. `fold` says how the output of
    `previous` depends on its weight (adapters.ScalingPair)."""
    prev = block.get_submodule(previous)
    s = scales.to(prev.weight.device, torch.float32)
    if not can_fold(prev, s.numel(), fold):
        raise UserError(f"cannot fold AWQ scales into '{previous}' ({type(prev).__name__})")
    rows = slice(prev.weight.shape[0] - s.numel(), None)  # all rows, or a fused linear's last ones
    if isinstance(prev, nn.Linear):
        prev.weight[rows] = prev.weight[rows].float() / s[:, None]
    elif fold == OFFSET:
        prev.weight.copy_((prev.weight.float() + 1) / s - 1)
    else:
        prev.weight.copy_(prev.weight.float() / s)
    if getattr(prev, "bias", None) is not None:
        prev.bias[rows] = prev.bias[rows].float() / s
    for name in linears:
        linear = block.get_submodule(name)
        linear.weight.copy_(linear.weight.float() * s)


class AWQSolver:
    """The runner's AWQ solver: `prepare_block` searches and folds the scales and clips the weights of
    each block; `inner` (RTNSolver or GPTQSolver) then quantizes the transformed block.

    judge: what scores a candidate scale. "rtn": rtn_error, AWQ's rounding on the group's linear outputs.
    "inner": inner.output_error (GPTQ's own loss) on at most `judge_rows` of the group's rows (rows are
    independent, and every candidate sees the same ones), scanning alpha only until the error has risen
    twice: a GPTQ solve per candidate. "block": BlockJudge on `judge_tokens` calibration tokens."""

    calibrated = True

    def __init__(self, inner, spec: QuantSpec, scaling_pairs, targets: set[str] | None = None,
                 n_grid: int = 20, duo_scaling: bool = True, clip: bool = True, max_tokens: int = 64 * 512,
                 judge: str = "rtn", judge_rows: int = 1024, judge_tokens: int = 4096,
                 overrides: dict[str, QuantSpec] | None = None):
        if not scaling_pairs:
            raise ValueError("AWQ needs the architecture's scaling pairs (previous op -> linears)")
        # the pairs of every block, or a function of a block's name prefix (blocks of different layouts)
        self.pairs_at = scaling_pairs if callable(scaling_pairs) else lambda prefix: scaling_pairs
        self.inner, self.spec, self.targets = inner, spec, targets
        self.overrides = overrides or {}  # linear -> its own spec; a pair's readers share one (formats fuse them)
        self.float_targets = getattr(inner, "float_targets", False)
        self.tunes_blocks = getattr(inner, "tunes_blocks", False)
        self.n_grid, self.duo_scaling, self.clip, self.max_tokens = n_grid, duo_scaling, clip, max_tokens
        if judge not in ("rtn", "inner", "block"):
            raise ValueError(f"unknown AWQ judge {judge!r}")
        self.judge, self.judge_rows, self.judge_tokens = judge, judge_rows, judge_tokens
        self.patience = 2 if judge == "inner" else None
        self.report: dict[str, dict] = {}
        self._search: dict[str, dict] = {}  # per linear, until quantize merges it into report

    def _inner_error(self, name: str) -> ScaledError:
        """The inner solver's error on W diag(s), whose inputs x / s have Gram matrix gram / (s s^T)."""
        def error(weight: torch.Tensor, s: torch.Tensor, gram: torch.Tensor) -> float:
            rows = weight[::math.ceil(weight.shape[0] / self.judge_rows)]
            return self.inner.output_error(rows * s, gram / (s[:, None] * s[None, :]), name)
        return error

    def _error(self, block: nn.Module, prefix: str, names: list[str], block_judge: BlockJudge | None) -> ScaledError:
        spec = self._spec(prefix + names[0])
        if self.judge == "block":
            return block_judge.error([block.get_submodule(n) for n in names], spec)
        return self._inner_error(prefix + names[0]) if self.judge == "inner" else rtn_error(spec)

    def _spec(self, name: str) -> QuantSpec:
        return self.overrides.get(name, self.spec)

    def _quantized(self, full_name: str) -> bool:
        return self.targets is None or full_name in self.targets

    @torch.no_grad()
    def prepare_block(self, block: nn.Module, prefix: str, inputs: BlockInputs, batch: int) -> None:
        start = time.perf_counter()
        pairs = self.pairs_at(prefix)
        stride = max(1, math.ceil(inputs.hidden.shape[0] * inputs.hidden.shape[1] / self.max_tokens))
        stats, hooks = {}, []
        for previous, names, _ in pairs:
            reader = block.get_submodule(names[0])
            stats[previous] = InputStats(reader.weight.shape[1], reader.weight.device, stride)  # a router, too
            hooks.append(reader.register_forward_pre_hook(lambda m, args, st=stats[previous]: st.add(args[0])))
        try:
            forward_block(block, inputs, batch, update=False)
        finally:
            for hook in hooks:
                hook.remove()
        block_judge = BlockJudge(block, inputs, batch, self.judge_tokens) if self.judge == "block" else None
        chosen = {}
        for previous, names, fold in pairs:  # every scale is folded before any clip is searched
            quantized = [n for n in names if self._quantized(prefix + n)]
            if not quantized:
                continue
            st = stats[previous]
            gram = st.gram
            entry = {"awq_pair": previous, "awq_tokens": st.tokens, "awq_judge": self.judge}
            if st.tokens and can_fold(block.get_submodule(previous), gram.shape[0], fold):
                weight = torch.cat([block.get_submodule(n).weight for n in quantized])
                best = search_scale(weight, gram, st.mean_abs, self._spec(prefix + quantized[0]), self.n_grid,
                                    self.duo_scaling, self._error(block, prefix, quantized, block_judge),
                                    self.patience)
                fold_scales(block, previous, list(names), best["scales"], fold)
                chosen[previous] = (best["scales"], gram)
                entry.update(awq_scaled=True, awq_alpha=best["alpha"], awq_error=best["error"],
                             awq_error_identity=best["error_identity"])
            else:  # e.g. v_proj -> o_proj under grouped-query attention, or an expert no token was routed to
                chosen[previous] = (torch.ones(gram.shape[0], device=gram.device), gram)
                entry["awq_scaled"] = False
            self._search.update({prefix + n: dict(entry) for n in quantized})
        for previous, names, _ in pairs:
            if previous not in chosen:
                continue
            s, gram = chosen[previous]
            gram = gram / (s[:, None] * s[None, :])  # the inputs now arrive divided by s
            for n in names:
                if not self.clip or n in NO_CLIP or not self._quantized(prefix + n):
                    continue
                linear = block.get_submodule(n)
                clamped, shrink = search_clip(linear.weight, gram, self._spec(prefix + n), self.n_grid)
                linear.weight.copy_(clamped)
                self._search[prefix + n]["awq_clip_mean"] = float(shrink.mean())
        seconds = time.perf_counter() - start
        for n in self._search:
            if n.startswith(prefix):
                self._search[n]["awq_block_seconds"] = seconds

    def observer(self, names, linears):
        return self.inner.observer(names, linears) if self.inner.calibrated else None  # runner skips the pass

    def quantize(self, name: str, linear: nn.Linear, observer) -> QuantizedWeight:
        qw = self.inner.quantize(name, linear, observer if self.inner.calibrated else None)
        self.report[name] = {**self._search.pop(name, {}), **self.inner.report.get(name, {})}
        return qw

    def finish_block(self, block, prefix, inputs, targets, results) -> dict[str, QuantizedWeight]:
        """The inner solver's block tuning, on the scaled block (scaling left the float outputs unchanged)."""
        tuned = self.inner.finish_block(block, prefix, inputs, targets, results)
        for name in tuned:
            self.report[name].update(self.inner.report[name])
        return tuned
