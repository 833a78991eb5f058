"""Quantize with AutoRound on the CPU from our calibration windows; writes its "fake" (float, quantized-dequantized)
checkpoint, computed in float32 so the saved weights are exactly on AutoRound's grid.

iters=0 is AutoRound's optimized RTN (imatrix-weighted scale search for symmetric grids); iters>0 is SignRound.
Run in the AutoRound venv: python scripts/peers/run_autoround.py --bits 4 --iters 0 --out DIR
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from common import base_parser, load_input_ids, setup_threads, write_run_info


def flatten(out: Path) -> None:
    """auto-round 0.16 saves into OUT/<model name>-w<bits>g<group>/: move that folder's files up into OUT."""
    if (out / "config.json").exists():
        return
    inner = [d for d in out.iterdir() if (d / "config.json").exists()]
    if len(inner) != 1:
        raise SystemExit(f"{out}: expected one saved checkpoint folder, found {[d.name for d in inner]}")
    for item in inner[0].iterdir():
        shutil.move(str(item), out / item.name)
    inner[0].rmdir()


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=0, help="0: optimized RTN; AutoRound's default is 200")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    setup_threads(args.threads)

    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_input_ids(args.samples)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    settings = dict(bits=args.bits, group_size=args.group_size, sym=args.sym, iters=args.iters,
                    nsamples=ids.shape[0], seqlen=ids.shape[1], batch_size=args.batch_size)
    start = time.perf_counter()
    rounder = AutoRound(model, tokenizer, dataset=[row[None] for row in ids], device_map="cpu", seed=0, **settings)
    rounder.quantize_and_save(str(args.out), format="fake")
    seconds = time.perf_counter() - start
    flatten(Path(args.out))
    write_run_info(args.out, "autoround", settings, seconds)
    print(f"autoround: wrote {args.out} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
