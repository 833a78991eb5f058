"""Mixture-of-experts blocks with one linear per expert projection, as checkpoints on disk name them.

transformers 5 keeps a block's experts as two fused 3D parameters (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]); checkpoints, vLLM and GPTQModel name them per expert
(`mlp.experts.3.gate_proj.weight`). The quantizer needs each expert's projections as linears of their
own: `unfuse` swaps the fused module for an `ExpertList` that computes the same thing with them, on the
device the fused parameters are on (the meta device of a streamed skeleton costs nothing).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError


_EXPERT = re.compile(r"^(.*\.experts|experts)\.(\d+)\.(.+)$")


def expert_of(name: str) -> tuple[str, int, str] | None:
    """'model.layers.3.mlp.experts.5.gate_proj.weight' -> ('model.layers.3.mlp.experts', 5, 'gate_proj.weight');
    None for a name outside the experts. The one place that knows how an expert's index sits in a name."""
    match = _EXPERT.match(name)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def merged_name(name: str) -> str:
    """The name without its expert index: what all experts' copies of one projection share."""
    expert = expert_of(name)
    return name if expert is None else f"{expert[0]}.{expert[2]}"


@dataclass(frozen=True)
class ExpertLayout:
    """Where a family keeps its experts and what its checkpoints call their projections."""

    path: str = "mlp.experts"  # the fused experts module, relative to a block (its name ends in "experts": expert_of)
    leaves: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert names on disk
    router: str = "mlp.gate"  # the router (kept in float), which reads what the experts read

    def names(self, count: int) -> tuple[list[tuple[str, str]], list[tuple[str]]]:
        """Per expert: (gate, up) and (down,) linear names relative to a block."""
        gate, up, down = self.leaves
        first = [(f"{self.path}.{e}.{gate}", f"{self.path}.{e}.{up}") for e in range(count)]
        return first, [(f"{self.path}.{e}.{down}",) for e in range(count)]


class Expert(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its three projections named as on disk."""

    def __init__(self, leaves: tuple[str, str, str], hidden: int, inner: int, act, device, dtype):
        super().__init__()
        self.leaves, self.act_fn = leaves, act
        gate, up, down = leaves
        for name, (i, o) in ((gate, (hidden, inner)), (up, (hidden, inner)), (down, (inner, hidden))):
            setattr(self, name, nn.Linear(i, o, bias=False, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.leaves)
        return down(self.act_fn(gate(x)) * up(x))


class ExpertList(nn.ModuleList):
    """Stands in for transformers' fused experts: same call, same result, one Expert per index.

    `observe_all`: while set (the runner's fallback pass for experts that were routed too few calibration
    tokens), those experts see every token, for observation only, and the output is meaningless."""

    def __init__(self, experts: list[Expert]):
        super().__init__(experts)
        self.observe_all: set[int] = set()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        if self.observe_all:
            for e in sorted(self.observe_all):
                self[e](hidden_states)
            return out
        # one sort groups the (token, slot) choices by expert; only the experts chosen run
        k = top_k_index.shape[-1]
        order = torch.argsort(top_k_index.reshape(-1), stable=True)
        counts = torch.bincount(top_k_index.reshape(-1), minlength=len(self)).tolist()
        for e, (start, n) in enumerate(zip([0, *itertools.accumulate(counts)], counts[:len(self)])):
            if n:
                chosen = order[start:start + n]
                tokens, slot = chosen // k, chosen % k
                y = self[e](hidden_states[tokens]) * top_k_weights[tokens, slot, None]
                out.index_add_(0, tokens, y.to(out.dtype))
        return out


def unfuse(block: nn.Module, layout: ExpertLayout) -> ExpertList:
    """Replace the block's fused experts with an ExpertList holding the same weights (none on meta)."""
    owner_name, _, attr = layout.path.rpartition(".")
    owner = block.get_submodule(owner_name) if owner_name else block
    fused = getattr(owner, attr)
    if isinstance(fused, ExpertList):
        return fused
    params = dict(fused.named_parameters())
    if set(params) != {"gate_up_proj", "down_proj"} or params["gate_up_proj"].dim() != 3:
        raise UserError(f"cannot place the experts of {type(fused).__name__}: expected fused gate_up_proj and "
                        f"down_proj, found {', '.join(sorted(params))}")
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    count, hidden, inner = down.shape
    if tuple(gate_up.shape) != (count, 2 * inner, hidden):
        raise UserError(f"cannot place the experts of {type(fused).__name__}: gate_up_proj is "
                        f"{list(gate_up.shape)}, down_proj {list(down.shape)}")
    experts = [Expert(layout.leaves, hidden, inner, fused.act_fn, gate_up.device, gate_up.dtype) for _ in range(count)]
    if not gate_up.is_meta:
        with torch.no_grad():
            for e, expert in enumerate(experts):
                gate, up, proj = (getattr(expert, n) for n in layout.leaves)
                gate.weight.copy_(gate_up[e, :inner])
                up.weight.copy_(gate_up[e, inner:])
                proj.weight.copy_(down[e])
    listed = ExpertList(experts)
    setattr(owner, attr, listed)
    return listed


def expert_count(block: nn.Module, layout: ExpertLayout) -> int:
    module = block.get_submodule(layout.path)
    return len(module) if isinstance(module, ExpertList) else module.down_proj.shape[0]
