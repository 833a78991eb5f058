"""Quantize with llm-compressor's GPTQModifier on the CPU from our calibration windows; writes a
compressed-tensors checkpoint (pack_quantized).

Groups use the block strategy [1, group_size]: its GROUP strategy refuses layers whose width is not a
multiple of the group size (the demo model's 576-wide layers at g128); one-row blocks are the same groups,
with a last partial group, as ours and GPTQModel's.
Run in the llm-compressor venv: python scripts/peers/run_llmcompressor.py --bits 4 --out DIR [--actorder weight]
"""

from __future__ import annotations

import time

import torch

from common import base_parser, load_input_ids, setup_threads, write_run_info


def run_oneshot(model_path: str, recipe, ids: torch.Tensor, out) -> float:
    """llm-compressor's oneshot on a float32 model with our calibration rows, saved compressed; wall seconds."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0], shuffle_calibration_samples=False)
    model.save_pretrained(str(out), save_compressed=True)
    tokenizer.save_pretrained(str(out))
    return time.perf_counter() - start


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--actorder", default=None, choices=["weight", "group"],
                        help="GPTQModifier actorder (its default is 'static' = weight; none here unless given)")
    parser.add_argument("--strategy", default="block", choices=["block", "group"],
                        help="group: GROUP strategy (fails when widths are not multiples of the group size)")
    parser.add_argument("--damp", type=float, default=0.01, help="dampening_frac (GPTQModifier's default)")
    args = parser.parse_args()
    setup_threads(args.threads)

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier

    ids = load_input_ids(args.samples)
    grid = {"block_structure": [1, args.group_size]} if args.strategy == "block" else {"group_size": args.group_size}
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.sym, strategy=args.strategy,
                               actorder=args.actorder, **grid)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], actorder=args.actorder, dampening_frac=args.damp)
    seconds = run_oneshot(args.model, recipe, ids, args.out)
    settings = dict(bits=args.bits, sym=args.sym, strategy=args.strategy, actorder=args.actorder,
                    dampening_frac=args.damp, samples=list(ids.shape), **grid)
    write_run_info(args.out, "llmcompressor", settings, seconds)
    print(f"llmcompressor: wrote {args.out} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
