"""The second-order cost of a weight change: what mixed precision prices settings by (see sensitivity.py,
which measures H and F).

A change dW to a linear moves its output by dW x; around the float model, the KL divergence of the next-token
distribution grows as 1/2 E[(g . dW x)^2] with g the gradient of log p(y) at that output for y drawn from the
model. With output channels and tokens taken as independent, that is 1/2 sum_o F_o dW_o H dW_o^T, where
H = E[x x^T] and F_o = E[g_o^2].
"""

from __future__ import annotations

import torch


def cost(dW: torch.Tensor, H: torch.Tensor, F: torch.Tensor) -> float:
    """1/2 sum_o F_o dW_o H dW_o^T: the predicted KL divergence (nats per token) of a weight change."""
    dW = dW.float()
    return 0.5 * float(((dW @ H) * dW).sum(1) @ F)


def solved_cost(name: str, weight: torch.Tensor, qw, observer, fisher: dict | None) -> dict:
    """{"kld_estimate": ...}: the predicted cost of what a solver wrote for linear `name`, with its own Hessian
    (H = 2 E[x x^T] on the quantized model's inputs); empty without one or without the linear's F."""
    if not fisher or name not in fisher or getattr(observer, "H", None) is None or not observer.n:
        return {}
    dW = weight.detach().float() - qw.dequantize().to(weight.device)
    return {"kld_estimate": cost(dW, observer.H.float() / 2, fisher[name].to(weight.device))}
