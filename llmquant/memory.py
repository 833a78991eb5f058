"""The host-memory budget of a run (`--max-memory`): what one decoder block needs, and where the calibration
activations live. They stay in RAM while they fit beside the block; otherwise they are memory-mapped
files that are read and written a batch at a time, with each batch's pages handed back as soon as the
batch is done, so resident memory stays near one block plus one batch however many samples there are.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import re
from pathlib import Path

import torch

from .errors import UserError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
         "GIB": 2**30, "TIB": 2**40}
BASE_BYTES = 600 * 2**20  # torch, transformers, the skeleton, the tokenizer: measured ~530 MiB before block 0
BLOCK_FACTOR = 2.5  # peak while a block is solved, per byte of its float32 weights (measured 2.4, 1B shape, RTN)
BATCH_FACTOR = 12  # a batch's working set per byte of its hidden states (attention and MLP intermediates)


def parse_size(text: str) -> int:
    """'2GB', '1.5GiB', '800MB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not match or match.group(2) not in UNITS:
        raise UserError(f"--max-memory wants a size such as 2GB or 1500MiB, not '{text}'")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def available_bytes() -> int:
    """Memory the system can give this process now (MemAvailable), or 0 where that cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def default_budget() -> int:
    """Four fifths of the memory available when the run starts."""
    return int(0.8 * available_bytes())


class Budget:
    """Bytes this run may hold on the host, and what is already promised."""

    def __init__(self, limit: int, block_params: int, solver_bytes: int, batch_bytes: int = 0):
        """`batch_bytes`: one batch of hidden states, whose attention and MLP intermediates a forward pass
        holds besides the block."""
        self.limit = limit
        self.block = BASE_BYTES + int(BLOCK_FACTOR * 4 * block_params) + solver_bytes + BATCH_FACTOR * batch_bytes
        self.used = self.block

    def check_block(self) -> None:
        if self.block > self.limit:
            raise UserError(f"--max-memory {_gib(self.limit)} is too small: one decoder block and one batch of "
                            f"activations need about {_gib(self.block)}")

    def take(self, nbytes: int) -> bool:
        """Promise `nbytes` more if they fit; False (and nothing promised) if not."""
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        """Hand back what `take` promised."""
        self.used -= nbytes


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class MappedTensor:
    """A tensor backed by a file in `directory`: the page cache holds it, not the process."""

    def __init__(self, directory: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype):
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        self.path = Path(directory) / f"{name}.activations"
        with open(self.path, "w+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)
            except OSError as err:
                raise UserError(f"cannot hold the calibration activations in {self.path} "
                                f"({nbytes / 2**20:.0f} MiB): {err.strerror or err}") from None
            self.map = mmap.mmap(f.fileno(), nbytes)
        self.tensor = torch.frombuffer(self.map, dtype=dtype).view(shape)

    def trim(self) -> None:
        """Hand the pages touched so far back to the system; the file keeps their contents."""
        self.map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.tensor = None
        try:
            self.map.close()
        except BufferError:  # a view of it is still alive; the mapping goes with it
            pass
        self.path.unlink(missing_ok=True)


M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
WEIGHT_SIZED = 4 << 20  # outside the solvers, allocations this large come from the system
REUSED = 32 << 20  # inside them: glibc's own ceiling for its moving threshold


@functools.cache
def _glibc():
    """glibc's allocator controls, or None where the C library is another (its allocator keeps its policy)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None


def _mmap_threshold(nbytes: int) -> None:
    if _glibc() is not None:
        _glibc()[0](M_MMAP_THRESHOLD, nbytes)


def weights_from_the_system() -> None:
    """Serve allocations of 4 MiB or more (weights as they are read, their copies, quantized fields on their
    way to the file) straight from the system, and give them back when freed. glibc otherwise serves them
    from its heap, which fragments and grows with every decoder block (1B shape, RTN, 2 threads: peak RSS
    1.53 GB at 22 layers, 1.78 GB at 44; with this and `solving`, 1.31 GB)."""
    _mmap_threshold(WEIGHT_SIZED)


@contextlib.contextmanager
def solving():
    """While a block is solved, allocations up to 32 MiB come from the heap: solvers reuse the same
    temporaries thousands of times (AWQ's scale search, GPTQ's passes, tuning), and fetching each from the
    system made AWQ 4x slower. Afterwards the heap's free pages go back to the system."""
    _mmap_threshold(REUSED)
    try:
        yield
    finally:
        _mmap_threshold(WEIGHT_SIZED)
        give_back_free_memory()


def give_back_free_memory() -> None:
    """Return the heap's free pages to the system (glibc keeps them otherwise)."""
    if _glibc() is not None:
        _glibc()[1](0)
