"""Quantize with AutoRound on the CPU from our calibration windows; writes its "fake" (float, quantized-dequantized)
checkpoint, computed in float32 so the saved weights are exactly on AutoRound's grid.

iters=0 is AutoRound's optimized RTN (imatrix-weighted scale search for symmetric grids); iters>0 is SignRound.
Run in the AutoRound venv: python scripts/peers/run_autoround.py --bits 4 --iters 0 --out DIR
"""

from __future__ import annotations

import time

import torch

from common import base_parser, load_input_ids, setup_threads, write_run_info


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
    write_run_info(args.out, "autoround", settings, seconds)
    print(f"autoround: wrote {args.out} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
