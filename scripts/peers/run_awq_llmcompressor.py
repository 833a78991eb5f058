"""Quantize with llm-compressor's AWQ (AWQModifier + QuantizationModifier) on the CPU from our calibration
windows; writes a compressed-tensors checkpoint (pack_quantized).

AWQModifier only searches the per-channel smoothing scales (grid of n_grid ratios, duo scaling, mappings
inferred from the architecture: Llama's four); the QuantizationModifier after it sets the groups' scales and
zero points with the scheme's observer (min-max by default; no AWQ clipping search) and packs the weights.
Groups use the GROUP strategy, which needs widths that are multiples of the group size (g64 on the demo).
Run in the llm-compressor venv: python scripts/peers/run_awq_llmcompressor.py --bits 4 --group-size 64 --asym --out DIR
"""

from __future__ import annotations

import torch

from common import base_parser, load_input_ids, setup_threads, write_run_info
from run_llmcompressor import run_oneshot


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n-grid", type=int, default=20, help="AWQModifier grid points (its default)")
    parser.add_argument("--duo-scaling", default="true", choices=["true", "false", "both"],
                        help="AWQModifier duo_scaling (its default: true, scales from activations and weights)")
    parser.add_argument("--observer", default=None, choices=["minmax", "memoryless_minmax", "mse", "memoryless_mse"],
                        help="weight observer (default: the scheme's, min-max)")
    args = parser.parse_args()
    setup_threads(args.threads)

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        # AWQModifier pins the cached layer inputs before its grid search (for faster host-to-device copies);
        # pin_memory() raises "Cannot access accelerator device when none is available" on a CPU-only
        # machine. Pinning changes no value, so skip it.
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

    ids = load_input_ids(args.samples)
    duo = {"true": True, "false": False, "both": "both"}[args.duo_scaling]
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.sym, strategy="group",
                               group_size=args.group_size, observer=args.observer)
    recipe = [
        AWQModifier(duo_scaling=duo, n_grid=args.n_grid),
        QuantizationModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                             ignore=["lm_head"]),
    ]
    seconds = run_oneshot(args.model, recipe, ids, args.out)
    settings = dict(method="awq", bits=args.bits, sym=args.sym, strategy="group", group_size=args.group_size,
                    duo_scaling=duo, n_grid=args.n_grid, observer=args.observer or "default (memoryless_minmax)",
                    samples=list(ids.shape))
    write_run_info(args.out, "llmcompressor-awq", settings, seconds)
    print(f"llmcompressor-awq: wrote {args.out} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
