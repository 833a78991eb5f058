"""Durable progress for long quantization runs: `--work-dir` keeps one record per finished block,
`--resume` continues from the last one.

A record holds the block's quantized tensors (integer-grid weights or GGUF block bytes), its solver
report, and the block's other parameters as they left it (AWQ folds its scales into norms and
biases); the newest record also holds the runner state (the calibration activations leaving that
block). Every file is written beside its
final name and renamed into place, so a `kill -9` leaves either a whole record or none. A
fingerprint of the model, the calibration samples and the settings guards against resuming
someone else's run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError
from .numerics.ggml import BlockTensor
from .numerics.grid import QuantizedWeight
from .version import __version__

FIELDS = ("codes", "scales", "zeros", "g_idx")
RECORD = re.compile(r"block-(\d{5})\.safetensors")


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
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class WorkDir:
    def __init__(self, path: Path, fp: dict, resume: bool):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "fingerprint.json"
        done = self.completed()
        if resume:
            if not meta.exists():
                raise UserError(f"--resume: {self.path} holds no earlier run")
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
            _write_atomic(self._state(index), lambda p: save_file({k: v.contiguous().cpu() for k, v in state.items()},
                                                                  p))
        tensors = {f"float.{name}": t.detach().contiguous().cpu() for name, t in floats.items()}
        specs = {}
        for name, qw in quantized.items():
            if isinstance(qw, BlockTensor):
                tensors[f"{name}.data"] = qw.data.contiguous().cpu()
                specs[name] = {"gguf": qw.type.name, "in_features": qw.in_features}
            else:
                tensors.update({f"{name}.{field}": getattr(qw, field).contiguous().cpu() for field in FIELDS})
                specs[name] = {"bits": qw.bits, "group_size": qw.group_size, "sym": qw.sym}
        meta = {"report": json.dumps(report), "specs": json.dumps(specs)}
        _write_atomic(self._record(index), lambda p: save_file(tensors, p, metadata=meta))
        self._state(index - 1).unlink(missing_ok=True)  # only the newest state is ever needed

    def load(self, index: int) -> tuple[dict[str, QuantizedWeight | BlockTensor], dict, dict[str, torch.Tensor]]:
        """(quantized weights, their report, the block's other parameters by full name)."""
        from gguf import GGMLQuantizationType

        quantized = {}
        try:
            with safe_open(self._record(index), "pt") as f:
                meta = f.metadata()
                for name, spec in json.loads(meta["specs"]).items():
                    if "gguf" in spec:
                        quantized[name] = BlockTensor(GGMLQuantizationType[spec["gguf"]],
                                                      f.get_tensor(f"{name}.data"), spec["in_features"])
                    else:
                        quantized[name] = QuantizedWeight(*(f.get_tensor(f"{name}.{field}") for field in FIELDS),
                                                          spec["bits"], spec["group_size"], spec["sym"])
                floats = {k.removeprefix("float."): f.get_tensor(k) for k in f.keys() if k.startswith("float.")}
                report = json.loads(meta["report"])
        except Exception:  # safetensors' own errors, bad JSON, missing keys: the record cannot be trusted
            raise _damaged(self._record(index), f"the record of block {index}") from None
        return quantized, report, floats

    def load_state(self, index: int) -> dict[str, torch.Tensor]:
        path = self._state(index)
        if not path.exists():
            raise UserError(f"--resume: {path} is missing; the work dir is incomplete")
        try:
            with safe_open(path, "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # the fingerprint fixed which streams there are
        except Exception:
            raise _damaged(path, f"the activations after block {index}") from None


def _damaged(path: Path, what: str) -> UserError:
    return UserError(f"--resume: {path} ({what}) is damaged; start again without --resume, or with a new "
                     f"--work-dir")
