"""Mixed precision: the setting of each linear that minimises the model's predicted loss under a size budget.

The format offers each linear its candidate settings with their exact bytes on disk and its own rounding
(formats/registry.py, `candidates` and `rounded`); with sensitivity.py's statistics, `price` costs each
candidate as the KL divergence its rounding error is predicted to cause. Linears a runtime fuses (vLLM's qkv_proj, gate_up_proj) form one unit that takes one setting.
The allocation is a multiple-choice knapsack solved greedily on each unit's lower convex hull of
(bytes, cost): every step takes the upgrade that buys the most predicted loss per byte while it fits,
which is optimal for the hulls and within one upgrade of optimal for the knapsack.
"""

from __future__ import annotations

import heapq
import sys
import time
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .numerics.kld import cost


@dataclass(frozen=True)
class Choice:
    """One candidate setting of a unit: format-specific (bits, group size) or a GGUF block type."""

    setting: object
    bytes: int
    cost: float  # predicted KL divergence, nats per token


@dataclass
class Unit:
    names: tuple[str, ...]  # the linears (full names) that take one setting together
    choices: list[Choice]  # every candidate, any order
    weights: int = 0  # the linears' weight count


@dataclass
class Allocation:
    chosen: dict[tuple[str, ...], Choice]  # unit -> its setting
    budget: int  # bytes the linears may take
    weights: int = 0
    predicted: float = 0.0  # the predicted KL divergence of the whole allocation
    seconds: float = 0.0  # measuring and allocating
    fisher: dict | None = None  # linear -> F (sensitivity.py), for the cost of what the solver really wrote
    linears: dict = field(default_factory=dict)  # linear -> its own Choice (bytes and cost) in its unit's setting

    def settings(self) -> dict[str, object]:
        """linear -> its setting."""
        return {name: choice.setting for unit, choice in self.chosen.items() for name in unit}

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.chosen.values())

    def to_dict(self, describe) -> dict:
        """What quant_report.json records: each unit's setting, bytes and predicted cost, and the totals."""
        return {"budget_bytes": self.budget, "bytes": self.bytes, "bpw": 8 * self.bytes / self.weights,
                "predicted_kld": self.predicted, "seconds": self.seconds, "units": [list(u) for u in self.chosen],
                "linears": {name: {"setting": describe(c.setting), "bytes": c.bytes, "predicted_kld": c.cost}
                            for name, c in self.linears.items()}}


def combine(names: tuple[str, ...], per_linear: dict[str, list[Choice]], weights: dict[str, int]) -> Unit:
    """A unit's choices: the settings every member can take, bytes and costs summed."""
    common = set.intersection(*(set(c.setting for c in per_linear[n]) for n in names))
    choices = []
    for setting in common:
        members = [next(c for c in per_linear[n] if c.setting == setting) for n in names]
        choices.append(Choice(setting, sum(c.bytes for c in members), sum(c.cost for c in members)))
    return Unit(names, choices, sum(weights[n] for n in names))


def _hull(choices: list[Choice]) -> list[Choice]:
    """The lower convex hull of (bytes, cost) from the smallest choice on, costs strictly falling."""
    ordered = sorted(choices, key=lambda c: (c.bytes, c.cost))
    kept: list[Choice] = []
    for c in ordered:
        if kept and c.cost >= kept[-1].cost:
            continue  # costs more bytes for no less loss
        while len(kept) >= 2 and _slope(kept[-2], kept[-1]) >= _slope(kept[-1], c):
            kept.pop()  # kept[-1] lies above the chord: never the best buy
        kept.append(c)
    return kept


def _slope(a: Choice, b: Choice) -> float:
    """Loss bought per byte going from a to b (negative: loss falls)."""
    return (b.cost - a.cost) / max(b.bytes - a.bytes, 1)


def feasible(units: list[Unit]) -> tuple[int, int]:
    """The fewest and the most bytes any allocation takes."""
    return (sum(min(c.bytes for c in u.choices) for u in units), sum(max(c.bytes for c in u.choices) for u in units))


def allocate(units: list[Unit], budget: int, unit_name: str = "bits per weight", scale: float = 1.0) -> Allocation:
    """The least predicted loss within `budget` bytes. A budget outside what any allocation takes is one
    line naming the feasible range (in `unit_name`: bytes times `scale`)."""
    empty = [u.names[0] for u in units if not u.choices]
    if empty:
        raise UserError(f"{empty[0]} has no setting the format can store; it cannot be allocated")
    low, high = feasible(units)
    if not low <= budget <= high:
        raise UserError(f"a budget of {budget * scale:.3f} {unit_name} is outside what the choices can meet: "
                        f"{low * scale:.3f} to {high * scale:.3f}")
    hulls = [_hull(u.choices) for u in units]
    position = [0] * len(units)
    spent = sum(h[0].bytes for h in hulls)
    heap = [(_slope(h[0], h[1]), i) for i, h in enumerate(hulls) if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        here, there = hulls[i][position[i]], hulls[i][position[i] + 1]
        if spent + there.bytes - here.bytes > budget:
            continue  # this unit's later upgrades cost more still
        spent += there.bytes - here.bytes
        position[i] += 1
        if position[i] + 1 < len(hulls[i]):
            heapq.heappush(heap, (_slope(hulls[i][position[i]], hulls[i][position[i] + 1]), i))
    chosen = {u.names: hulls[i][position[i]] for i, u in enumerate(units)}
    chosen = _fill(units, chosen, budget - spent)
    return Allocation(chosen, budget, sum(u.weights for u in units), sum(c.cost for c in chosen.values()))


def _fill(units: list[Unit], chosen: dict, left: int) -> dict:
    """Spend what the hull steps left over: single changes, off the hulls too, best loss first."""
    while True:
        best = None
        for u in units:
            now = chosen[u.names]
            for c in u.choices:
                extra, gain = c.bytes - now.bytes, now.cost - c.cost
                if gain > 0 and extra <= left and (best is None or gain > best[0]):
                    best = (gain, u.names, c, extra)
        if best is None:
            return chosen
        _, names, c, extra = best
        chosen[names], left = c, left - extra


def print_plan(allocation: Allocation, describe, file=sys.stderr) -> None:
    """The allocation, one line per unit: its linears, setting, bytes and predicted cost."""
    for names, choice in allocation.chosen.items():
        print(f"{', '.join(names):<60} {describe(choice.setting):>12} {choice.bytes:>12,} B  "
              f"predicted KLD {choice.cost:.2e}", file=file)
    print(f"total: {allocation.bytes:,} of {allocation.budget:,} bytes, {8 * allocation.bytes / allocation.weights:.3f} "
          f"bits per weight, predicted KLD {allocation.predicted:.4f}", file=file)


def price(fmt, config, weight, H, F) -> list[Choice]:
    """Every candidate setting the format offers for `weight`: its bytes, and the predicted cost of its rounding
    (the format's own, weighted by the input's second moment as GPTQ and the imatrix weigh it)."""
    importance = torch.diagonal(H)
    return [Choice(setting, size, cost(weight - fmt.rounded(config, weight, setting, importance), H, F))
            for setting, size in fmt.candidates(*weight.shape)]


def budget_of(config, units: list[Unit]) -> tuple[int, float]:
    """(bytes the linears may take at --target-bpw, bits per weight per byte)."""
    weights = sum(u.weights for u in units)
    return int(config.target_bpw * weights / 8), 8 / weights


def allocate_plan(fmt, checkpoint, config, plan, samples, progress: bool = True):
    """(config, plan) of format `fmt` with each linear's setting allocated at config.target_bpw: the
    sensitivity pass prices every candidate the format offers, then `allocate` chooses."""
    from .sensitivity import measure

    start = time.perf_counter()
    shapes = checkpoint.state_shapes()
    weights = {n: shapes[n + ".weight"].numel() for n in plan.targets}
    measured = measure(checkpoint, samples, set(plan.targets),
                       lambda name, W, H, F: (price(fmt, config, W, H, F), F.cpu()), config.device, config.seed,
                       progress)
    prices = {name: choices for name, (choices, _) in measured.items()}
    units = [combine(unit, prices, weights) for unit in fmt.units(checkpoint, plan)]
    budget, scale = budget_of(config, units)
    allocation = allocate(units, budget, scale=scale)
    allocation.seconds = time.perf_counter() - start
    allocation.fisher = {name: F for name, (_, F) in measured.items()}
    allocation.linears = {name: next(c for c in prices[name] if c.setting == setting)
                          for name, setting in allocation.settings().items()}
    return fmt.apply(config, plan, allocation)
