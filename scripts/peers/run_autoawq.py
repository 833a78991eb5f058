"""Quantize with AutoAWQ (casper-hansen/AutoAWQ 0.2.9, deprecated) on the CPU from our calibration windows;
writes an AWQ GEMM checkpoint at 4 bits, a float "fake" checkpoint of AutoAWQ's own quantized weights otherwise.

Calibration: our rows as a list of token-id lists; AutoAWQ concatenates them and cuts max_calib_seq_len blocks,
which with rows of exactly that length gives back the same rows. Its GEMM packer (WQLinear_GEMM) is 4-bit
only ("Only 4-bit are supported for now."), so for other widths the search runs with export_compatible=True
(scales and clipping applied to the float weights, nothing packed) and each linear is then quantized exactly
as its _apply_quant does (cast to float16, AwqQuantizer.pseudo_quantize_tensor) and saved dequantized,
(q - z) * s in float32 (at 4 bits identical to to_float.py's copy of the GEMM checkpoint: --format fake).
Run in the AutoAWQ venv: python scripts/peers/run_autoawq.py --bits 4 --group-size 64 --asym --out DIR
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from common import base_parser, load_input_ids, setup_threads, write_run_info


def fake_quantize(model) -> int:
    """After an export_compatible run: quantize-dequantize every linear AutoAWQ would have packed."""
    from awq.utils.module import exclude_layers_to_not_quantize, get_named_linears

    quantizer, count = model.quantizer, 0
    for layer in quantizer.modules:
        linears = exclude_layers_to_not_quantize(get_named_linears(layer), quantizer.modules_to_not_convert)
        for linear in linears.values():
            wq, scales, _ = quantizer.pseudo_quantize_tensor(linear.weight.data.half())  # as _apply_quant does
            # wq = (q - z) * s rounded to float16; keep (q - z) * s in float32, the value to_float.py reads
            # from a GEMM checkpoint (q - z is recovered exactly: |q - z| < 2^bits, relative error 2^-11)
            s = scales.float().repeat_interleave(wq.shape[1] // scales.shape[1], dim=1)
            linear.weight.data = (torch.round(wq.float() / s) * s).to(linear.weight.dtype)
            count += 1
    return count


def copy_weights_in_scale_search() -> None:
    """AutoAWQ's scale search (_compute_best_scale) saves the weights as {k: v.cpu() for k, v in state_dict} and
    loads them back after each candidate. From a GPU that is a copy; on the CPU `.cpu()` returns the tensor itself,
    which the first candidate then scales in place (fc.weight.mul_), so the "restored" weights and every later
    candidate start from W * s_0, and the fold after the search scales the linears a second time: W s^2 against
    the norm's 1 / s (measured on its W4 g64 checkpoint: relative weight error 0.59 at layer 0 q_proj, KLD 8.85).
    While the search runs, `.cpu()` of a CPU tensor returns a copy, as it does from a GPU."""
    from awq.quantize.quantizer import AwqQuantizer

    search = AwqQuantizer._compute_best_scale

    def copying_search(self, *args, **kwargs):
        cpu = torch.Tensor.cpu
        torch.Tensor.cpu = lambda t, *a, **k: t.clone() if t.device.type == "cpu" else cpu(t, *a, **k)
        try:
            return search(self, *args, **kwargs)
        finally:
            torch.Tensor.cpu = cpu

    AwqQuantizer._compute_best_scale = copying_search


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="weights while searching (AutoAWQ's default float16 is slow on the CPU); "
                             "the final quantization casts each linear to float16 either way")
    parser.add_argument("--n-parallel", type=int, default=16,
                        help="n_parallel_calib_samples: rows per forward (memory only; default all at once)")
    parser.add_argument("--format", choices=["auto", "gemm", "fake"], default="auto",
                        help="auto: gemm at 4 bits (the only width its packer takes), fake otherwise")
    parser.add_argument("--no-clip", action="store_true", help="apply_clip=False (default: clipping search on)")
    args = parser.parse_args()
    setup_threads(args.threads)

    from awq import AutoAWQForCausalLM
    from transformers import PreTrainedTokenizerFast

    copy_weights_in_scale_search()

    ids = load_input_ids(args.samples)
    dtype = torch.float32 if args.dtype == "float32" else torch.float16
    gemm = args.format == "gemm" or (args.format == "auto" and args.bits == 4)
    quant_config = {"zero_point": not args.sym, "q_group_size": args.group_size, "w_bit": args.bits,
                    "version": "GEMM"}
    model = AutoAWQForCausalLM.from_pretrained(args.model, torch_dtype=dtype, device_map="cpu")
    # only used by AutoAWQ to encode text calibration data; the checkpoint's tokenizer_config names the
    # transformers 5 class TokenizersBackend, which 4.x lacks, so build the fast tokenizer from tokenizer.json
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(args.model) / "tokenizer.json"))
    start = time.perf_counter()
    model.quantize(tokenizer, quant_config=quant_config, calib_data=ids.tolist(), max_calib_samples=ids.shape[0],
                   max_calib_seq_len=ids.shape[1], n_parallel_calib_samples=args.n_parallel,
                   apply_clip=not args.no_clip, export_compatible=not gemm)
    if gemm:
        model.save_quantized(str(args.out))
    else:
        n = fake_quantize(model)
        model.model.config.quantization_config = {
            "quant_method": "autoawq-fake", "format": "fake", "bits": args.bits, "group_size": args.group_size,
            "zero_point": not args.sym, "quantized_linears": n}
        model.model.save_pretrained(str(args.out))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # as they are
        if (Path(args.model) / name).exists():
            shutil.copy(Path(args.model) / name, args.out / name)
    seconds = time.perf_counter() - start
    settings = dict(method="awq", bits=args.bits, group_size=args.group_size, sym=args.sym,
                    format="gemm" if gemm else "fake", dtype=args.dtype, n_parallel=args.n_parallel,
                    apply_clip=not args.no_clip, samples=list(ids.shape))
    write_run_info(args.out, "autoawq", settings, seconds)
    print(f"autoawq: wrote {args.out} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
