"""Shared bits of the peer runners; imported by each run_*.py in the peer's own venv (stdlib, torch, safetensors)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open

DEFAULT_SAMPLES = "/tmp/peers/calib_wikitext2_128x512_seed0.safetensors"
DEFAULT_MODEL = str(Path.home() / ".cache/llmquant/SmolLM2-135M-Instruct")
MAX_SAMPLE_ELEMENTS = 1 << 24  # a calibration file larger than this is not ours


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="float HF checkpoint (default: the demo model)")
    parser.add_argument("--samples", default=DEFAULT_SAMPLES, help="safetensors with input_ids int64 [n, seqlen]")
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=128)
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True)
    sym.add_argument("--asym", dest="sym", action="store_false")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def setup_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def load_input_ids(path: str) -> torch.LongTensor:
    """The calibration windows make_samples.py wrote, checked before use."""
    with safe_open(path, framework="pt") as f:
        if "input_ids" not in f.keys():
            raise SystemExit(f"{path}: no input_ids tensor")
        shape = f.get_slice("input_ids").get_shape()
        if len(shape) != 2 or shape[0] * shape[1] > MAX_SAMPLE_ELEMENTS:
            raise SystemExit(f"{path}: input_ids shape {shape} is not [n, seqlen] of a sane size")
        ids = f.get_tensor("input_ids")
    if ids.dtype != torch.int64:
        raise SystemExit(f"{path}: input_ids is {ids.dtype}, expected int64")
    return ids


def write_run_info(out: Path, peer: str, settings: dict, seconds: float) -> None:
    """peer_run.json beside the checkpoint: what was asked and how long the quantization itself took."""
    info = {"peer": peer, "settings": settings, "quantize_s": round(seconds, 2), "finished": time.time()}
    (out / "peer_run.json").write_text(json.dumps(info, indent=1, default=str))
