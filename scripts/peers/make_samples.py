"""Write the protocol's calibration windows once, so every peer quantizer sees exactly the token ids ours sees.

Run in our venv: python scripts/peers/make_samples.py OUT.safetensors [--source FILE] [--n 128] [--seqlen 512]
Output: `input_ids` int64 [n, seqlen], plus metadata naming the source, seed and tokenizer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file
from transformers import AutoTokenizer

from llmquant.calibration import load_samples
from llmquant.models.demo import demo_model_path

DEFAULT_SOURCE = "/work/shared/data/wikitext2/valid.tokens.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default=None, help="tokenizer folder (default: the demo model)")
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = args.model or str(demo_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = load_samples(args.source, tokenizer, args.n, args.seqlen, args.seed).contiguous()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids}, str(args.out),
              metadata={"source": args.source, "seed": str(args.seed), "tokenizer": model})
    print(f"wrote {args.out}: input_ids {tuple(ids.shape)} {ids.dtype}, first ids {ids[0, :8].tolist()}")


if __name__ == "__main__":
    main()
