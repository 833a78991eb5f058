"""How much a change to each linear's weight costs the model: what mixed precision allocates bits by.

One pass over a few calibration samples, block by block from the shards as the runner reads them:
forward through the float model keeping each block's input, then back from the output distribution,
each block recomputed with autograd in reverse order. For every linear it measures

    H = E[x x^T]    the second moment of its (float) input
    F = E[g * g]    per output channel, g the gradient of log p(y) at the linear's output for a token y
                    drawn from the model's own next-token distribution: the diagonal of the Fisher
                    information there

and a weight change dW then costs the model about 1/2 sum_o F_o dW_o H dW_o^T nats of KL divergence per
token (second order around the float model, output channels and tokens taken as independent). The
pass hands (name, weight, H, F) to a pricing function while the block is in memory and keeps only what
it returns, so no more than one block's statistics are ever held.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import capture_inputs
from .errors import UserError
from .models.checkpoint import Checkpoint, prefix_of

SAMPLES = 8  # calibration samples the pass runs (x --seqlen tokens): enough for a ranking, cheap next to a solve


def _normal(value):
    """A copy of the captured block arguments outside inference mode, which autograd can save."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_normal(v) for v in value)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def _head(checkpoint: Checkpoint, device):
    """(logits(h) after the last block, the norm to release): the final norm, the output embedding (the
    input one where the checkpoint stores none: tied), the family's logit scaling or soft-capping."""
    model = checkpoint.model
    norm = getattr(model.base_model, "norm", None)
    if norm is None:
        raise UserError(f"--target-bpw measures the model's output through its final norm, and "
                        f"{type(model).__name__} has none at model.norm: not supported for this family yet")
    checkpoint.materialize(norm, prefix_of(model, norm), device, torch.float32)
    head = prefix_of(model, model.get_output_embeddings()) + "weight"
    if checkpoint.adapter.to_disk(head) not in checkpoint.index:
        head = prefix_of(model, model.get_input_embeddings()) + "weight"
    weight = checkpoint.read(head, torch.float32).to(device)
    scaling = getattr(model.config, "logits_scaling", None) or 1.0
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def logits(h: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.linear(norm(h), weight) / scaling
        return torch.tanh(z / softcap) * softcap if softcap else z

    return logits, norm


def measure(checkpoint: Checkpoint, samples: torch.Tensor, targets: set[str],
            price: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], object], device="cpu", seed: int = 0,
            progress: bool = True) -> dict[str, object]:
    """price(name, weight [out, in] float32, H [in, in], F [out]) for each linear in `targets` (full names),
    on the first SAMPLES rows of `samples`. Holds every block's input for them (SAMPLES x seqlen x hidden
    in the checkpoint's dtype per block) besides one block in float32."""
    model, adapter = checkpoint.model, checkpoint.adapter
    samples = samples[:SAMPLES]
    blocks = adapter.blocks(model)
    dtype, device = torch.float32, torch.device(device)
    embedding = model.get_input_embeddings()
    checkpoint.materialize(embedding, prefix_of(model, embedding))
    captured = capture_inputs(model, adapter, samples, device, dtype)
    checkpoint.release(embedding)
    kwargs = [_normal(kw) for kw in captured.block_kwargs]
    hidden = captured.hidden.clone()
    stored: list[torch.Tensor] = []  # each block's input, in the checkpoint's dtype
    bar = tqdm(total=2 * len(blocks) + 1, desc="measuring sensitivity", unit="pass", disable=not progress,
               file=sys.stderr)
    with torch.no_grad():
        for index, block in enumerate(blocks):
            stored.append(hidden.to(checkpoint.dtype, copy=True))
            _load(checkpoint, block, adapter.block_prefix(index), device)
            for i in range(hidden.shape[0]):
                out = block(hidden[i:i + 1], **kwargs[index])
                hidden[i:i + 1] = out[0] if isinstance(out, tuple) else out
            checkpoint.release(block)
            bar.update()
    grad = _output_gradient(checkpoint, hidden, device, seed)
    bar.update()
    prices: dict[str, object] = {}
    for index in reversed(range(len(blocks))):
        prefix = adapter.block_prefix(index)
        names = [n for n in adapter.for_block(index).linears() if prefix + n in targets]
        block = _load(checkpoint, blocks[index], prefix, device)
        grad, stats = _backward_block(block, stored.pop(), grad, kwargs[index], names)
        for name in names:
            H, F, tokens = stats[name]
            prices[prefix + name] = price(prefix + name, block.get_submodule(name).weight.float(), H / max(tokens, 1),
                                          F / max(tokens, 1))
        checkpoint.release(block)
        bar.update()
    bar.close()
    return prices


def _load(checkpoint: Checkpoint, block: nn.Module, prefix: str, device) -> nn.Module:
    checkpoint.materialize(block, prefix, device, torch.float32)
    return block.to(device=device, dtype=torch.float32)


def _output_gradient(checkpoint: Checkpoint, hidden: torch.Tensor, device, seed: int) -> torch.Tensor:
    """d log p(y) / d h at the last block's output, y drawn from the model's own distribution at each
    position (a fixed generator: the same samples give the same statistics)."""
    logits, norm = _head(checkpoint, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    grad = torch.empty_like(hidden)
    for i in range(hidden.shape[0]):
        h = hidden[i].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logp = torch.log_softmax(logits(h), -1)
            y = torch.multinomial(logp.detach().exp(), 1, generator=generator)
            (g,) = torch.autograd.grad(logp.gather(-1, y).sum(), h)
        grad[i] = g
    checkpoint.release(norm)
    return grad


def _backward_block(block: nn.Module, inputs: torch.Tensor, grad: torch.Tensor, kwargs: dict,
                    names: list[str]) -> tuple[torch.Tensor, dict]:
    """(the gradient at the block's input, {linear: (sum x x^T, sum g*g per output, tokens)})."""
    stats = {n: [None, None, 0] for n in names}
    hooks, grams = [], {}  # grams: this sample's x^T x by input tensor, which linears of a group share

    def record(name):
        def hook(module, args, out):
            if id(args[0]) not in grams:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                grams[id(args[0])] = (args[0], x.T @ x, x.shape[0])  # the input kept: its id stays its own
            _, gram, tokens = grams[id(args[0])]
            entry = stats[name]
            entry[0] = gram.clone() if entry[0] is None else entry[0].add_(gram)
            entry[2] += tokens

            def grad_hook(g):
                g2 = g.detach().reshape(-1, g.shape[-1]).float().pow(2).sum(0)
                entry[1] = g2 if entry[1] is None else entry[1].add_(g2)

            if out.requires_grad:
                out.register_hook(grad_hook)
        return hook

    for name in names:
        hooks.append(block.get_submodule(name).register_forward_hook(record(name)))
    grad_in = torch.empty_like(grad)
    try:
        for i in range(inputs.shape[0]):
            x = inputs[i:i + 1].float().requires_grad_(True)
            with torch.enable_grad():
                out = block(x, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                out.backward(grad[i:i + 1])
            grad_in[i:i + 1] = x.grad
            grams.clear()
    finally:
        for hook in hooks:
            hook.remove()
    result = {}
    for name, (H, F, tokens) in stats.items():
        linear = block.get_submodule(name)
        H = H if H is not None else torch.zeros(linear.in_features, linear.in_features)
        F = F if F is not None else torch.zeros(linear.out_features)
        result[name] = (H, F, tokens)
    return grad_in, result
