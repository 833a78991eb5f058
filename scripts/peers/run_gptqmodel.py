"""Quantize with GPTQModel (GPTQ) on the CPU from our calibration windows; writes a gptq_v2 checkpoint.

gptq_v2 stores zero points as they are; the v1 layout (zero - 1) underflows for asymmetric groups whose
zero is 0 and would charge GPTQModel with a packing loss that is not its solver's.
Run in the GPTQModel venv: GPTQMODEL_CPU_WORKERS=2 python scripts/peers/run_gptqmodel.py --bits 4 --out DIR
"""

from __future__ import annotations

import time

from common import base_parser, load_input_ids, setup_threads, write_run_info


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--desc-act", action="store_true", help="act-order (disables GAR)")
    parser.add_argument("--no-gar", action="store_true", help="desc_act=False without act_group_aware")
    parser.add_argument("--damp", type=float, default=None, help="damp_percent (default: GPTQModel's)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=["auto", "float32"], default="auto",
                        help="weights while quantizing: its auto choice is bfloat16 on the CPU, whose matmuls are "
                             "slow without AVX-512/AMX; float32 is faster there and solves on the same weights we do")
    parser.add_argument("--offload-to-disk", action="store_true",
                        help="GPTQModel's default; off here: a 135M model fits in memory and the disk writes dominate")
    args = parser.parse_args()
    setup_threads(args.threads)

    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT

    ids = load_input_ids(args.samples)
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    settings = dict(bits=args.bits, group_size=args.group_size, sym=args.sym, desc_act=args.desc_act,
                    format=FORMAT.GPTQ_V2, offload_to_disk=args.offload_to_disk)
    if args.desc_act or args.no_gar:
        settings["act_group_aware"] = False
    if args.damp is not None:
        settings["damp_percent"] = args.damp
    config = QuantizeConfig(**settings)
    start = time.perf_counter()
    import torch

    model = GPTQModel.load(args.model, config, dtype=torch.float32 if args.dtype == "float32" else "auto")
    model.quantize(calibration, batch_size=args.batch_size)
    model.save(str(args.out))
    seconds = time.perf_counter() - start
    settings.update(act_group_aware=config.act_group_aware, damp_percent=config.damp_percent,
                    samples=list(ids.shape), dtype=args.dtype)
    write_run_info(args.out, "gptqmodel", settings, seconds)
    print(f"gptqmodel: wrote {args.out} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
