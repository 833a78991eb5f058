"""An adapter for a family nobody declared, found by running its first decoder block once on the meta device.

What the quantizer needs is visible in one forward pass of a block: which linears read the same tensor
(the input-sharing groups, in the order they run), which norm produced that tensor (an AWQ pair; how the
norm applies its weight is measured on a copy of it), which linear's output is multiplied elementwise
into another group's input (the up -> down pair of a gated MLP), and which child's output is its last
linear's output (the replayable children). Attention's v -> o pair is not found this way: without it AWQ
still scales everything else. The block runs on meta tensors, so inspecting costs no memory and no time.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UserError
from .adapters import OFFSET, SCALE, ArchAdapter, ScalingPair

MULTIPLY = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}


class _Products(TorchFunctionMode):
    """Records every elementwise product (a * b) computed, with its operands."""

    def __init__(self):
        super().__init__()
        self.products: list[tuple[torch.Tensor, tuple]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in MULTIPLY:
            self.products.append((out, args))
        return out


def find_blocks(model: nn.Module, family: str) -> str:
    """The path of the decoder blocks: the ModuleList of identical modules holding the most parameters."""
    best, size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            n = sum(p.numel() for p in module.parameters())
            if n > size and any(isinstance(m, nn.Linear) for m in module[0].modules()):
                best, size = name, n
    if best is None:
        from .adapters import ADAPTERS

        raise UserError(f"unsupported architecture '{family}': its {type(model).__name__} has no list of identical "
                        f"blocks holding linears to inspect; declared families: {', '.join(sorted(ADAPTERS))}")
    return best


def _block_kwargs(model: nn.Module, blocks: nn.ModuleList, width: int) -> dict:
    """The keyword arguments the model hands block 0 (mask, rotary tables), moved to the meta device. The
    model runs on the CPU from zero input embeddings up to block 0: only its buffers, which are real, count."""
    from ..activations import Captured, Catcher, block_arguments

    first, recorded = blocks[0], [None]
    blocks[0] = Catcher(first, 0, recorded)
    try:
        model(inputs_embeds=torch.zeros(1, 8, width), use_cache=False)
    except Captured:
        pass
    finally:
        blocks[0] = first
    return block_arguments(recorded[0], "meta", torch.float32)


class _Trace:
    """One forward pass of a block on meta tensors: every linear's input in call order, every module's
    output, every elementwise product. Tensors are held, so identity (`is`) means the same tensor."""

    def __init__(self, block: nn.Module, kwargs: dict, width: int):
        self.calls: list[tuple[str, torch.Tensor]] = []
        self.outputs: dict[str, object] = {}
        hooks = []
        for name, module in block.named_modules():
            if not name:
                continue
            if isinstance(module, nn.Linear):
                hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: self.calls.append((n, a[0]))))
            hooks.append(module.register_forward_hook(lambda m, a, out, n=name: self.outputs.__setitem__(n, out)))
        products = _Products()
        try:
            with products, torch.no_grad():
                block(torch.zeros(1, 8, width, device="meta"), **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        self.products = products.products

    def producer(self, tensor: torch.Tensor) -> str | None:
        return next((n for n, out in self.outputs.items() if out is tensor), None)


def _fold_of(norm: nn.Module, width: int) -> str | None:
    """How a norm applies its weight, measured on a CPU copy: x * w (SCALE), x * (1 + w) (OFFSET), or
    neither (None: no AWQ pair through it)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (width,) or list(norm.children()):
        return None
    probe = copy.deepcopy(norm).to_empty(device="cpu").float()
    if isinstance(getattr(probe, "bias", None), torch.Tensor):
        probe.bias.data.zero_()  # a bias is divided by s with the weight (fold_scales)
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(0))
    outs = []
    for w in (torch.full((width,), 0.5), torch.full((width,), 1.5)):
        probe.weight.data = w
        with torch.no_grad():
            outs.append(probe(x))
    if torch.allclose(outs[1], 3 * outs[0], rtol=1e-4, atol=1e-6):
        return SCALE
    if torch.allclose(outs[1] / 2.5, outs[0] / 1.5, rtol=1e-4, atol=1e-6):
        return OFFSET
    return None


def discover(model: nn.Module, family: str, warn: bool = True) -> ArchAdapter:
    """The adapter of a Llama-like block, found by inspecting block 0 of `model` (any device, meta included);
    a weight it cannot place is one line naming it."""
    path = find_blocks(model, family)
    blocks = model.get_submodule(path)
    block = blocks[0]
    linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    placed = {f"{n}.weight" for n in linears}
    for name, param in block.named_parameters():
        if param.dim() >= 2 and name not in placed:
            raise UserError(f"cannot place '{path}.0.{name}' of family '{family}': a weight outside any linear "
                            f"(fused experts?); it needs a declared adapter")
    trace = _trace(model, blocks, family)
    ran = [n for n, _ in trace.calls]
    for name in linears:
        if ran.count(name) != 1:
            how = "never ran" if name not in ran else "ran more than once"
            raise UserError(f"cannot place '{path}.0.{name}' of family '{family}': it {how} in a forward pass of "
                            f"the block")
    groups = _groups(trace)
    tails = _tails(block, trace)
    adapter = ArchAdapter(family, sequential=tuple(tuple(names) for _, names in groups),
                          scaling_pairs=_scaling_pairs(block, trace, groups, linears), replayable=tuple(tails),
                          tails=tails, blocks_path=path, gguf_arch="")
    if warn:
        warnings.warn(describe(adapter), stacklevel=2)
    return adapter


def _trace(model: nn.Module, blocks: nn.ModuleList, family: str) -> _Trace:
    width = model.config.hidden_size
    try:
        kwargs = _block_kwargs(model, blocks, width)
        block = blocks[0]
        if any(not p.is_meta for p in block.parameters()):  # a model in memory: trace a weightless copy
            block = copy.deepcopy(block).to("meta")
        return _Trace(block, kwargs, width)
    except Exception as err:  # a block that cannot run on meta tensors cannot be inspected
        raise UserError(f"cannot inspect block 0 of family '{family}' to quantize it ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); it needs a declared adapter") from None


def _groups(trace: _Trace) -> list[tuple[torch.Tensor, list[str]]]:
    """Linears that read the very same tensor, in the order they first run."""
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in trace.calls:
        group = next((g for g in groups if g[0] is x), None)
        if group is None:
            groups.append((x, [name]))
        else:
            group[1].append(name)
    return groups


def _scaling_pairs(block, trace: _Trace, groups, linears: list[str]) -> tuple[ScalingPair, ...]:
    """A group fed by a norm folds into that norm (as the norm applies its weight); one fed by an elementwise
    product with a linear's output (a gated MLP's up) folds into that linear's rows."""
    pairs = []
    for x, names in groups:
        source = trace.producer(x)
        module = block.get_submodule(source) if source else None
        if source and not isinstance(module, nn.Linear) and (fold := _fold_of(module, x.shape[-1])):
            pairs.append(ScalingPair(source, tuple(names), fold))
            continue
        for out, operands in trace.products:
            if out is x:
                feeding = [trace.producer(t) for t in operands if isinstance(t, torch.Tensor)]
                linear = next((f for f in feeding if f in linears), None)
                if linear is not None:
                    pairs.append(ScalingPair(linear, tuple(names)))
    return tuple(pairs)


def _tails(block, trace: _Trace) -> dict[str, tuple[str, bool]]:
    """Children whose output is their last linear's output (attention returns it with the weights)."""
    ran = [n for n, _ in trace.calls]
    tails = {}
    for child, _ in block.named_children():
        inside = [n for n in ran if n.startswith(child + ".")]
        out = trace.outputs.get(child)
        if not inside or out is None:
            continue
        first = out[0] if isinstance(out, tuple) else out
        if first is trace.outputs.get(inside[-1]):
            tails[child] = (inside[-1].removeprefix(child + "."), isinstance(out, tuple))
    return tails


def describe(adapter: ArchAdapter) -> str:
    groups = " | ".join(",".join(g) for g in adapter.sequential)
    pairs = ", ".join(f"{p.previous}->{'/'.join(r.rsplit('.', 1)[-1] for r in p.readers)}"
                      for p in adapter.scaling_pairs) or "none"
    return (f"family '{adapter.family}' has no declared adapter; using the one found in its first block: blocks "
            f"at {adapter.blocks_path}, linears solved as [{groups}], AWQ pairs {pairs}")
