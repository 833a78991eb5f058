"""Quantize with GPTQModel (GPTQ, or AWQ with --method awq) on the CPU from our calibration windows; writes
a gptq_v2 checkpoint (GPTQ) or an AWQ GEMM checkpoint (AWQ).

gptq_v2 stores zero points as they are; the v1 layout (zero - 1) underflows for asymmetric groups whose
zero is 0 and would charge GPTQModel with a packing loss that is not its solver's. The AWQ GEMM layout
stores raw zero points; 4-bit codes in AutoAWQ's interleaved order, other widths (3-bit) as a plain
little-endian bit stream along the output dimension (GPTQModel's own extension, read by its torch kernel).
Run in the GPTQModel venv: GPTQMODEL_CPU_WORKERS=2 python scripts/peers/run_gptqmodel.py --bits 4 --out DIR
"""

from __future__ import annotations

import time

from common import base_parser, load_input_ids, setup_threads, write_run_info


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["gptq", "awq"], default="gptq",
                        help="awq: METHOD.AWQ with FORMAT.GEMM (the GPTQ-only flags below are then refused)")
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
    if args.method == "awq" and (args.desc_act or args.no_gar or args.damp is not None):
        parser.error("--desc-act, --no-gar and --damp are GPTQ settings")
    setup_threads(args.threads)

    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    ids = load_input_ids(args.samples)
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    if args.method == "awq":
        settings = dict(method=METHOD.AWQ, format=FORMAT.GEMM, bits=args.bits, group_size=args.group_size,
                        sym=args.sym, offload_to_disk=args.offload_to_disk)
    else:
        settings = dict(bits=args.bits, group_size=args.group_size, sym=args.sym, desc_act=args.desc_act,
                        format=FORMAT.GPTQ_V2, offload_to_disk=args.offload_to_disk)
        if args.desc_act or args.no_gar:
            settings["act_group_aware"] = False
        if args.damp is not None:
            settings["damp_percent"] = args.damp
    config = QuantizeConfig(**settings)
    start = time.perf_counter()
    import torch

    if args.method == "awq" and args.dtype == "float32":
        # The AWQ packer (AwqTorchLinear, the CPU choice) is validated against the layer's dtype and lists only
        # float16/bfloat16, though its pack() takes float32 weights and stores float16 scales (the GEMM
        # format's); the GPTQ packer is not given the dtype. Let the float32 run reach pack().
        from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

        AwqTorchLinear.SUPPORTS_DTYPES = [*AwqTorchLinear.SUPPORTS_DTYPES, torch.float32]
    model = GPTQModel.load(args.model, config, dtype=torch.float32 if args.dtype == "float32" else "auto")
    model.quantize(calibration, batch_size=args.batch_size)
    model.save(str(args.out))
    seconds = time.perf_counter() - start
    if args.method == "gptq":
        settings.update(act_group_aware=config.act_group_aware, damp_percent=config.damp_percent)
    settings.update(samples=list(ids.shape), dtype=args.dtype)
    peer = "gptqmodel" if args.method == "gptq" else "gptqmodel-awq"
    write_run_info(args.out, peer, settings, seconds)
    print(f"{peer}: wrote {args.out} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
