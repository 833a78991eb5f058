"""Block-wise tuning of the rounding: SignRound (Cheng et al., 2023), started from GPTQ's result.

GPTQ keeps each linear's own output; what the next block reads is the block's output, where the
linears' errors meet through attention, the MLP's gate and the residual stream. Starting from each
weight's unrounded code (GPTQ's error-compensated weight on the grid, before rounding), every weight
may move to the neighbouring code and every group scale may shrink or grow, chosen by signed gradient
descent on the squared distance between the block's output on the quantized model's inputs and the
float block's output on the float model's inputs. Rounding is differentiated straight through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..numerics.grid import QuantizedWeight


@dataclass(frozen=True)
class TuneSpec:
    iters: int = 0  # 0: no tuning
    samples: int = 4  # calibration samples per step
    lr: float = 0.005  # step of the rounding offsets (decays linearly to 0), in codes
    scale_lr: float = 0.25  # step of the log scales, relative to lr


def _unrounded_grid(qw: QuantizedWeight, unrounded: torch.Tensor, offset: torch.Tensor,
                    log_scale: torch.Tensor) -> torch.Tensor:
    """The weight rebuilt from round(unrounded + offset) with scales * exp(log_scale); rounding passes
    gradients straight through."""
    g = qw.g_idx.long()
    t = unrounded + offset
    codes = (t + (t.round() - t).detach()).clamp(0, (1 << qw.bits) - 1)
    scales = qw.scales.to(t.device) * log_scale.exp()
    return (codes - qw.zeros[:, g].to(t.device)) * scales[:, g]


def _trainable(value):
    """A copy autograd can save for the backward pass (the runner's activations are inference tensors)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_trainable(v) for v in value)
    return value


def _batches(n: int, size: int, generator: torch.Generator):
    """Endless random batches of sample indices, each sample once per pass."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            yield order[start:start + size]


def tune_block(block: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, kwargs: dict,
               weights: dict[str, tuple[QuantizedWeight, torch.Tensor]], spec: TuneSpec,
               generator: torch.Generator) -> tuple[dict[str, QuantizedWeight], dict]:
    """New QuantizedWeights for `weights` (linear name in block -> (its GPTQ result, unrounded codes)),
    tuned so that block(hidden[i]) approaches targets[i], the float block's output for sample i.
    Also returns the mean block-output error of the first and last steps."""
    device, dtype = next(block.parameters()).device, next(block.parameters()).dtype  # hidden may be on the host
    offsets = {n: torch.zeros_like(u, requires_grad=True) for n, (_, u) in weights.items()}
    log_scales = {n: torch.zeros_like(qw.scales, device=device, requires_grad=True) for n, (qw, _) in weights.items()}
    size = min(spec.samples, hidden.shape[0])
    batches = _batches(hidden.shape[0], size, generator)
    kwargs = {k: _trainable(v) for k, v in kwargs.items()}
    losses = []
    for step in range(spec.iters):
        index = next(batches)
        with torch.enable_grad():
            params = {f"{n}.weight": _unrounded_grid(qw, u, offsets[n], log_scales[n]).to(dtype)
                      for n, (qw, u) in weights.items()}
            out = torch.func.functional_call(block, params, (_trainable(hidden[index].to(device)),), kwargs)
            out = out[0] if isinstance(out, tuple) else out
            loss = (out.float() - targets[index].to(device).float()).pow(2).mean()
            grads = torch.autograd.grad(loss, [*offsets.values(), *log_scales.values()])
        losses.append(float(loss))
        step_lr = spec.lr * (1 - step / spec.iters)
        with torch.no_grad():
            for o, g in zip(offsets.values(), grads):
                o.sub_(g.sign(), alpha=step_lr).clamp_(-0.5, 0.5)
            for s, g in zip(log_scales.values(), grads[len(offsets):]):
                s.sub_(g.sign(), alpha=step_lr * spec.scale_lr)
    tuned = {}
    with torch.no_grad():
        for n, (qw, u) in weights.items():
            codes = (u + offsets[n]).round().clamp(0, (1 << qw.bits) - 1).to(torch.uint8)
            scales = (qw.scales.to(device) * log_scales[n].exp()).to(torch.float16).float()
            tuned[n] = QuantizedWeight(codes, scales, qw.zeros.to(device), qw.g_idx.to(device), qw.bits,
                                       qw.group_size, qw.sym)
    return tuned, {"tune_loss_first": losses[0], "tune_loss_last": losses[-1]}
