"""Sharded safetensors written tensor by tensor, in any order, never all in memory.

Every tensor's name, dtype and shape is known before the first block is quantized, so each shard's
header (and so every tensor's offset) is fixed up front: a tensor is written at its offset the
moment it exists, and dropped. The files are byte for byte what `safetensors.torch.save_file`
writes for the same tensors (the header's order is taken from safetensors itself), sharded as
`huggingface_hub.split_torch_state_dict_into_shards` shards them, so streaming changes no output.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors.torch import save

from ..errors import UserError

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
               torch.int64: "I64", torch.int8: "I8", torch.uint8: "U8", torch.float64: "F64", torch.int16: "I16",
               torch.bool: "BOOL"}
METADATA = {"format": "pt"}


class Planned:
    """A tensor still to be written: what the header needs."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...]):
        self.dtype, self.shape = dtype, tuple(int(s) for s in shape)
        self.nbytes = torch.Size(self.shape).numel() * dtype.itemsize


def _header(plan: dict[str, Planned]) -> tuple[bytes, dict[str, int]]:
    """(the header bytes safetensors would write for these tensors, name -> offset of its data in the file)."""
    probe = save({name: torch.zeros(1, dtype=t.dtype) for name, t in plan.items()}, metadata=METADATA)
    (length,) = struct.unpack("<Q", probe[:8])
    order = [k for k in json.loads(probe[8:8 + length]) if k != "__metadata__"]
    header, offsets, at = {"__metadata__": METADATA}, {}, 0
    for name in order:
        t = plan[name]
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + t.nbytes]}
        offsets[name] = at
        at += t.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {name: start + off for name, off in offsets.items()}


class ShardedWriter:
    """`put` each planned tensor once, in any order; `close` checks that all were written and writes the
    index of a sharded checkpoint."""

    def __init__(self, directory: Path, plan: dict[str, Planned], max_shard_size: str | int = "4GB"):
        self.directory = Path(directory)
        split = split_state_dict_into_shards_factory(plan, get_storage_size=lambda t: t.nbytes,
                                                     filename_pattern="model{suffix}.safetensors",
                                                     max_shard_size=max_shard_size)
        self.plan, self.split, self.where, self.pending = plan, split, {}, set(plan)
        self.files = {}
        for filename, names in split.filename_to_tensors.items():
            header, offsets = _header({n: plan[n] for n in names})
            path = self.directory / filename
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.files[filename] = fd
            _write_at(fd, header, 0, path)
            _reserve(fd, len(header) + sum(plan[n].nbytes for n in names), path)
            self.where.update({n: (fd, offsets[n], path) for n in names})

    def put(self, name: str, tensor: torch.Tensor) -> None:
        planned = self.plan[name]
        if name not in self.pending or tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise ValueError(f"tensor '{name}' {tensor.dtype} {tuple(tensor.shape)} does not match the plan "
                             f"{planned.dtype} {planned.shape} (or was written twice)")
        fd, offset, path = self.where[name]
        data = tensor.detach().cpu().contiguous()
        _write_at(fd, data.reshape(-1).view(torch.uint8).numpy().tobytes(), offset, path)
        self.pending.discard(name)

    def close(self) -> None:
        if self.pending:
            raise ValueError(f"{len(self.pending)} planned tensors were never written (first: {min(self.pending)})")
        for fd in self.files.values():
            os.close(fd)
        self.files = {}
        if self.split.is_sharded:
            index = {"metadata": {"total_size": sum(t.nbytes for t in self.plan.values())},
                     "weight_map": self.split.tensor_to_filename}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files = {}


def _write_at(fd: int, data: bytes, offset: int, path: Path) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as err:
            raise UserError(f"writing {path} failed: {err.strerror or err}") from None
        view, offset = view[n:], offset + n


def _reserve(fd: int, size: int, path: Path) -> None:
    """Claim the file's whole size now, so a disk too small fails before the work, not in the middle of it."""
    if not size:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        raise UserError(f"writing {path} failed: {err.strerror or err} (needs {size / 2**20:.1f} MiB)") from None
