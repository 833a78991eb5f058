"""Calibration activations of one decoder block: capture the inputs of block 0, keep them (in memory or
memory-mapped within the run's budget), and run them through a block batch by batch. The runner and the
solvers that search over a block's outputs (AWQ, tuning) both use it; it knows nothing of either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .memory import MappedTensor
from .models.adapters import ArchAdapter

BATCH_TOKENS = 4096  # calibration tokens per forward batch


class Captured(Exception):
    """Ends a forward pass early once what was needed has been recorded."""


class Catcher(nn.Module):
    """Stands in for a decoder block: records what the model feeds it. Block 0 keeps the hidden states of
    every sample; every block keeps its keyword arguments once (attention mask, rotary embeddings: they
    differ between blocks of sliding-window and full attention). The forward pass stops at block 0 once
    every block's arguments are known, else at the last block, passing the hidden states on in between."""

    def __init__(self, block: nn.Module, index: int, kwargs: list):
        super().__init__()
        self.block, self.index, self.kwargs = block, index, kwargs
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder block received positional arguments beyond hidden_states")
        if self.index == 0:
            self.hidden = hidden_states
        if self.kwargs[self.index] is None:
            self.kwargs[self.index] = kwargs
        if self.index == len(self.kwargs) - 1 or all(k is not None for k in self.kwargs):
            raise Captured
        return hidden_states


def _move(value, device, dtype, memo: dict):
    """Tensors (also inside tuples) to the work device; floating ones to the compute dtype. A tensor several
    blocks share is moved once (`memo`, by identity)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = (value, value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype))
        return memo[id(value)][1]
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device, dtype, memo) for v in value)
    return value


def block_arguments(kwargs: dict, device, dtype, memo: dict | None = None) -> dict:
    """What a block was called with, minus the caching switches, on `device` (floating tensors in `dtype`)."""
    drop = {"past_key_values", "past_key_value", "use_cache", "output_attentions"}
    return {k: _move(v, device, dtype, {} if memo is None else memo) for k, v in kwargs.items() if k not in drop}


@dataclass
class BlockInputs:
    """The calibration activations entering a block. They live on the host (in memory or memory-mapped)
    unless the work device is the CPU too; each batch goes to the work device (`device`) for its forward."""

    hidden: torch.Tensor  # [N, L, H], compute dtype
    kwargs: dict  # the current block's keyword arguments, at batch size 1 on the work device (see at_block)
    reference: torch.Tensor | None = None  # the float model's hidden states at the same block (float targets)
    mapped: list = field(default_factory=list)  # memory.MappedTensors behind hidden / reference, if on disk
    budget: object | None = None  # memory.Budget that optional records are taken from (None: ask the system)
    device: torch.device | None = None  # the work device (None: where `hidden` is)
    block_kwargs: list[dict] | None = None  # every block's keyword arguments (None: `kwargs` serves all)

    def __post_init__(self):
        self.device = torch.device(self.device) if self.device is not None else self.hidden.device

    def at_block(self, index: int) -> BlockInputs:
        """Ready for block `index`: its own attention mask and rotary embeddings."""
        if self.block_kwargs is not None:
            self.kwargs = self.block_kwargs[index]
        return self

    def batch(self, stream: torch.Tensor, rows) -> torch.Tensor:
        """Rows of a stream (hidden or reference) on the work device."""
        return stream[rows].to(self.device, non_blocking=True)

    def trim(self) -> None:
        """After a batch: the pages of memory-mapped streams go back to the system."""
        for stream in self.mapped:
            stream.trim()


@torch.inference_mode()
def capture_inputs(model: nn.Module, adapter: ArchAdapter, samples: torch.Tensor, device, dtype,
                   allocate=None) -> BlockInputs:
    """Run the model up to block 0 for each sample (on the model's own device, cheap: embeddings only).
    `allocate(name, shape, dtype)` gives the host tensor the hidden states are kept in and the MappedTensor
    behind it, if any (default: host memory, pinned when the work device is a GPU)."""
    blocks = adapter.blocks(model)
    originals = list(blocks)
    block_kwargs = [None] * len(blocks)
    catchers = [Catcher(block, i, block_kwargs) for i, block in enumerate(originals)]
    hidden, mapped = None, []
    try:
        for i, catcher in enumerate(catchers):
            blocks[i] = catcher
        for i in range(samples.shape[0]):
            try:
                model(samples[i:i + 1], use_cache=False)
            except Captured:
                pass
            if hidden is None:
                shape = (samples.shape[0], *catchers[0].hidden.shape[1:])
                hidden, backing = (allocate or in_memory(device))("hidden", shape, dtype)
                mapped += [backing] if backing is not None else []
            hidden[i:i + 1] = catchers[0].hidden.to(dtype=dtype)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    memo = {}
    block_kwargs = [block_arguments(kw, device, dtype, memo) for kw in block_kwargs]
    return BlockInputs(hidden, block_kwargs[0], mapped=mapped, device=device, block_kwargs=block_kwargs)


def in_memory(device):
    """Host memory for activations that fit; pinned for a GPU, so batches copy to it asynchronously."""
    pin = torch.device(device).type == "cuda"
    return lambda name, shape, dtype: (torch.empty(shape, dtype=dtype, pin_memory=pin), None)


class Replay(nn.Module):
    """Stands in for a block child whose output can no longer change (adapter.replayable, its linears
    quantized): the first pass records the output of each batch, later passes return the record. When
    the pass that solved the child's last linear kept that linear's inputs (`tail_inputs`, one per batch),
    the output is that linear applied to them, and nothing before it in the child is computed again."""

    def __init__(self, module: nn.Module, tail: nn.Linear | None = None, tail_inputs: list | None = None,
                 with_weights: bool = False):
        super().__init__()
        self.module = module
        self.batch: int | None = None  # index of the batch being run, set by forward_block
        self.outputs: dict[int, object] = {}
        self.tail, self.tail_inputs, self.with_weights = tail, tail_inputs or [], with_weights

    def forward(self, *args, **kwargs):
        if self.batch not in self.outputs:
            if self.batch < len(self.tail_inputs):
                out = self.tail(self.tail_inputs[self.batch])
                self.tail_inputs[self.batch] = None  # used once: its output is recorded instead
                self.outputs[self.batch] = (out, None) if self.with_weights else out
            else:
                self.outputs[self.batch] = self.module(*args, **kwargs)
        return self.outputs[self.batch]


@torch.inference_mode()
def forward_block(block: nn.Module, inputs: BlockInputs, batch: int, update: bool,
                  reference: nn.Module | None = None) -> None:
    """Run every sample through the block; with update, the outputs replace the inputs in place.
    A hook may raise Captured to end a batch's forward early, once it has seen what it needs.
    With a reference (the block's float copy), each batch first runs through it on inputs.reference."""
    streams = [(block, inputs.hidden)] if reference is None else [(reference, inputs.reference), (block, inputs.hidden)]
    replays = [m for module, _ in streams for m in module.children() if isinstance(m, Replay)]
    for index, start in enumerate(range(0, inputs.hidden.shape[0], batch)):
        for replay in replays:
            replay.batch = index
        for module, hidden in streams:
            try:
                out = module(inputs.batch(hidden, slice(start, start + batch)), **inputs.kwargs)
            except Captured:
                continue
            if update:
                hidden[start:start + batch] = out[0] if isinstance(out, tuple) else out  # back to the host
        inputs.trim()


def budgeted_allocator(budget, spill_dir, streams: int):
    """allocate(name, shape, dtype) for capture_inputs: in memory if all `streams` of that size fit in the
    budget, else memory-mapped files in spill_dir. `allocate.where` says which, once decided."""

    def allocate(name, shape, dtype):
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if allocate.where is None:
            allocate.in_memory = budget.take(streams * nbytes)
            allocate.where = "in memory" if allocate.in_memory else f"memory-mapped in {spill_dir}"
        if allocate.in_memory:
            return torch.empty(shape, dtype=dtype), None
        if spill_dir is None:
            raise ValueError("activations beyond the budget need a spill_dir")
        mapped = MappedTensor(spill_dir, name, shape, dtype)
        return mapped.tensor, mapped

    allocate.where = None
    return allocate
