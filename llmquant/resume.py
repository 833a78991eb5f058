"""Durable progress for long quantization runs: `--work-dir` keeps one record per finished block,
`--resume` continues from the last one.

A record holds the block's quantized tensors (integer-grid weights or GGUF block bytes), its solver
report, and the block's other parameters as they left it (AWQ folds its scales into norms and
biases); beside the two newest records lies the runner state (the calibration activations leaving
that block). Every file is written beside its final name and renamed into place, so a `kill -9`
leaves either a whole record or none, and carries a checksum of its tensors, checked when it is read:
a damaged record or state costs the blocks from it on (back to the last block whose state is kept, or
to block 0), never the run. A fingerprint of the model, the calibration samples and the settings
guards against resuming someone else's run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .errors import UserError
from .numerics.ggml import BlockTensor
from .numerics.grid import QuantizedWeight
from .version import __version__

FIELDS = ("codes", "scales", "zeros", "g_idx")
RECORD = re.compile(r"block-(\d{5})\.safetensors")
STATES_KEPT = 2  # the newest record can be redone from the state before it


class Damaged(UserError):
    """A work-dir file that cannot be read back as written."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path} ({what}) is damaged; run again with --resume to redo it")
        self.path, self.what = path, what


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: what a record's reader must get back,
    whatever the file's layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _save_verified(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` atomically with their digest in the header."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**(metadata or {}), "sha256": tensors_digest(tensors)}
    _write_atomic(path, lambda p: save_file(tensors, p, metadata=meta))


def _load_verified(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file `_save_verified` wrote; Damaged if it is missing, unreadable or not
    what was written."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # missing, truncated, a bad header: safetensors' own errors, OSError
        raise Damaged(path, what) from None
    if meta.get("sha256") != tensors_digest(tensors):
        raise Damaged(path, what + ", checksum")
    return tensors, meta


def file_digest(path: Path, edge: int = 1 << 20) -> str:
    """Cheap identity of a large file: size, header and the first and last megabyte."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(edge))
        f.seek(max(0, path.stat().st_size - edge))
        h.update(f.read(edge))
    return h.hexdigest()


def fingerprint(model_dir: Path, samples: torch.Tensor | None, settings: dict) -> dict:

    model = hashlib.sha256((Path(model_dir) / "config.json").read_bytes())
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        model.update(f"{f.name}:{file_digest(f)}".encode())
    calib = "none" if samples is None else hashlib.sha256(samples.cpu().numpy().tobytes()).hexdigest()
    return {"model": model.hexdigest(), "calibration": calib, "settings": settings, "llmquant": __version__}


def _write_atomic(path: Path, write) -> None:
    """`write(temporary)`, flushed, then renamed onto `path`; a failed write leaves `path` as it was."""
    tmp = path.with_name(path.name + ".partial")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        tmp.unlink(missing_ok=True)
        reason = err.strerror if isinstance(err, OSError) else _io_reason(str(err))
        raise UserError(f"writing {path} failed: {reason}") from None


def _io_reason(message: str) -> str:
    """The OS's words inside a safetensors error ('... message: "No space left on device" })')."""
    found = re.search(r'message: "([^"]+)"', message)
    return found.group(1) if found else message


class WorkDir:
    def __init__(self, path: Path, fp: dict, resume: bool):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "fingerprint.json"
        done = self.completed()
        if resume and not meta.exists():
            if done:
                raise _damaged(meta, "the run's fingerprint, missing")
            tqdm.write(f"llmquant: nothing is recorded in {self.path} yet; starting from block 0", file=sys.stderr)
        elif resume:
            try:
                old = json.loads(meta.read_text())
                assert isinstance(old, dict)
            except (OSError, ValueError, AssertionError):
                raise _damaged(meta, "the run's fingerprint") from None
            differs = [k for k in ("model", "calibration", "settings", "llmquant") if old.get(k) != fp.get(k)]
            if differs:
                raise UserError(f"--resume: {self.path} was made with a different {' and '.join(differs)}; "
                                f"use another --work-dir or start again without --resume")
        elif done or meta.exists():
            raise UserError(f"{self.path} holds progress of an earlier run; pass --resume to continue it "
                            f"or choose an empty --work-dir")
        _write_atomic(meta, lambda p: p.write_text(json.dumps(fp, indent=2)))

    def completed(self) -> int:
        """Blocks finished, counted contiguously from block 0."""
        indices = {int(m.group(1)) for p in self.path.iterdir() if (m := RECORD.fullmatch(p.name))}
        n = 0
        while n in indices:
            n += 1
        return n

    def _record(self, index: int) -> Path:
        return self.path / f"block-{index:05d}.safetensors"

    def _state(self, index: int) -> Path:
        return self.path / f"state-{index:05d}.safetensors"

    def save(self, index: int, quantized: dict[str, QuantizedWeight | BlockTensor], report: dict,
             state: dict[str, torch.Tensor], floats: dict[str, torch.Tensor]) -> None:
        """State (the runner's hidden-state streams; none for uncalibrated runs) first, then the record:
        a whole record always has its state beside it."""
        if state:
            _save_verified(state, self._state(index))
        tensors = {f"float.{name}": t for name, t in floats.items()}
        specs = {}
        for name, qw in quantized.items():
            if isinstance(qw, BlockTensor):
                tensors[f"{name}.data"] = qw.data
                specs[name] = {"gguf": qw.type.name, "in_features": qw.in_features}
            else:
                tensors.update({f"{name}.{field}": getattr(qw, field) for field in FIELDS})
                specs[name] = {"bits": qw.bits, "group_size": qw.group_size, "sym": qw.sym}
        _save_verified(tensors, self._record(index), {"report": json.dumps(report), "specs": json.dumps(specs)})
        self._state(index - STATES_KEPT).unlink(missing_ok=True)

    def load(self, index: int) -> tuple[dict[str, QuantizedWeight | BlockTensor], dict, dict[str, torch.Tensor]]:
        """(quantized weights, their report, the block's other parameters by full name); Damaged if the
        record is not what was written."""
        from gguf import GGMLQuantizationType

        what = f"the record of block {index}"
        tensors, meta = _load_verified(self._record(index), what)
        quantized = {}
        try:
            for name, spec in json.loads(meta["specs"]).items():
                if "gguf" in spec:
                    quantized[name] = BlockTensor(GGMLQuantizationType[spec["gguf"]], tensors[f"{name}.data"],
                                                  spec["in_features"])
                else:
                    quantized[name] = QuantizedWeight(*(tensors[f"{name}.{field}"] for field in FIELDS),
                                                      spec["bits"], spec["group_size"], spec["sym"])
            report = json.loads(meta["report"])
        except (KeyError, ValueError, TypeError):  # verified bytes, but not a record this version reads
            raise Damaged(self._record(index), what) from None
        floats = {k.removeprefix("float."): v for k, v in tensors.items() if k.startswith("float.")}
        return quantized, report, floats

    def load_state(self, index: int) -> dict[str, torch.Tensor]:
        """The hidden-state streams leaving block `index` (the fingerprint fixed which there are)."""
        return _load_verified(self._state(index), f"the activations after block {index}")[0]

    def resume_point(self, stateful: bool) -> int:
        """How many blocks to take from the records: every record before it and (`stateful`: the runner
        carries activations) the state after its last block read back as written. A damaged file is
        reported on stderr, and it and everything after it are deleted (newest first, so a fault leaves a
        contiguous prefix); the run then redoes those blocks."""
        done = self.completed()
        for index in range(done):
            try:
                self.load(index)
            except Damaged as err:
                done = self._back_to(index, err)
                break
        while stateful and done:
            try:
                self.load_state(done - 1)
                break
            except Damaged as err:  # then the block before it: its state is the other one kept
                done = self._back_to(done - 1, err)
        return done

    def _back_to(self, index: int, err: Damaged) -> int:
        tqdm.write(f"llmquant: {err.path.name} in {self.path} ({err.what}) is damaged or missing; "
                   f"redoing block {index} and after", file=sys.stderr)
        numbered = [(int(m.group(2)), p) for p in self.path.iterdir()
                    if (m := re.fullmatch(r"(block|state)-(\d{5})\.safetensors", p.name))]
        for number, path in sorted(numbered, key=lambda item: -item[0]):
            if number >= index:
                path.unlink(missing_ok=True)
        return index


def _damaged(path: Path, what: str) -> UserError:
    return UserError(f"--resume: {path} ({what}) is damaged; start again without --resume, or with a new "
                     f"--work-dir")
