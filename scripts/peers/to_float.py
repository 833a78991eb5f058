"""Turn a peer's quantized checkpoint into a float32 checkpoint of its dequantized weights, which our
evaluator loads as a plain model (config without quantization_config).

Formats, by config.json `quantization_config`:
  gptq (checkpoint_format gptq = v1, zero stored - 1; gptq_v2, zero stored as is)   -> our venv (/tmp/venv)
  compressed-tensors (llm-compressor), dequantized by transformers + compressed-tensors -> the llm-compressor venv
  AutoRound and run_autoawq.py "fake" checkpoints (weights already quantized-dequantized) -> any venv
  awq GEMM (AutoAWQ, GPTQModel METHOD.AWQ; raw zero points): 4-bit codes in AutoAWQ's interleaved order,
    read by llmquant's unpack_awq; other widths (GPTQModel only) a plain bit stream along the output
    dimension, read by llmquant's unpack_int32                                      -> our venv (/tmp/venv)
The output holds exactly the base model's tensor names and shapes; anything else is an error.
Usage: python scripts/peers/to_float.py SRC DST [--base BASE]   (PYTHONPATH=/work/main for gptq/awq folders)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DEFAULT_BASE = str(Path.home() / ".cache/llmquant/SmolLM2-135M-Instruct")
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what to add to a stored zero
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja")


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    if not tensors:
        raise SystemExit(f"{folder}: no .safetensors files")
    return tensors


def _shapes(folder: Path) -> dict[str, list[int]]:
    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    return shapes


def dequantize_gptq(tensors: dict[str, torch.Tensor], bits: int, zero_offset: int) -> dict[str, torch.Tensor]:
    """Replace every (qweight, qzeros, scales, g_idx) quadruple by `weight` = (q - z) * s, float32 [out, in]."""
    from llmquant.numerics.pack import unpack_int32

    out = {k: v for k, v in tensors.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    for name in [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]:
        g_idx = tensors[f"{name}.g_idx"].long()
        scales = tensors[f"{name}.scales"].float()  # [groups, out]
        n_out = tensors[f"{name}.qweight"].shape[1]
        codes = unpack_int32(tensors[f"{name}.qweight"], bits, dim=0, n=g_idx.numel()).long()  # [in, out]
        zeros = unpack_int32(tensors[f"{name}.qzeros"], bits, dim=1, n=n_out).long() + zero_offset  # [groups, out]
        if scales.shape != zeros.shape or int(g_idx.max()) >= scales.shape[0] or int(g_idx.min()) < 0:
            raise SystemExit(f"{name}: scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}, g_idx out of range")
        out[f"{name}.weight"] = ((codes - zeros[g_idx]) * scales[g_idx]).T.contiguous()
    return out


def dequantize_awq(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """Replace every AWQ GEMM (qweight, qzeros, scales) triple by `weight` = (q - z) * s, float32 [out, in]."""
    from llmquant.numerics.pack import unpack_awq, unpack_int32
    from llmquant.numerics.grid import QuantizedWeight, default_g_idx

    out = {k: v for k, v in tensors.items() if not k.endswith((".qweight", ".qzeros", ".scales"))}
    for name in [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]:
        packed = {f: tensors[f"{name}.{f}"] for f in ("qweight", "qzeros", "scales")}
        n_in, (groups, n_out) = packed["qweight"].shape[0], packed["scales"].shape
        if groups != (1 if group_size == -1 else -(-n_in // group_size)):
            raise SystemExit(f"{name}: {groups} groups of scales for {n_in} inputs at group size {group_size}")
        if bits == 4:
            qw = unpack_awq(packed, group_size, sym=False)
        else:  # GPTQModel's non-4-bit GEMM: no interleave, codes as a little-endian bit stream along dim 1
            codes = unpack_int32(packed["qweight"], bits, dim=1, n=n_out).T.contiguous()
            zeros = unpack_int32(packed["qzeros"], bits, dim=1, n=n_out).T.to(torch.int32).contiguous()
            qw = QuantizedWeight(codes, packed["scales"].float().T.contiguous(), zeros,
                                 default_g_idx(n_in, group_size), bits, group_size, False)
        if qw.codes.shape != (n_out, n_in) or qw.zeros.shape != (n_out, groups):
            raise SystemExit(f"{name}: codes {tuple(qw.codes.shape)}, zeros {tuple(qw.zeros.shape)} do not fit "
                             f"scales {tuple(packed['scales'].shape)}")
        out[f"{name}.weight"] = qw.dequantize(torch.float32)
    return out


def dequantize_compressed_tensors(src: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    return {k: v.detach() for k, v in model.state_dict().items()}


def dequantized(src: Path, qconfig: dict) -> dict[str, torch.Tensor]:
    method = str(qconfig.get("quant_method", "")).lower()
    packing = str(qconfig.get("packing_format", ""))
    if method == "gptq":
        fmt = qconfig.get("checkpoint_format", qconfig.get("format", "gptq"))
        if fmt not in GPTQ_FORMATS:
            raise SystemExit(f"{src}: gptq checkpoint_format {fmt!r} is not one of {sorted(GPTQ_FORMATS)}")
        return dequantize_gptq(_read_tensors(src), int(qconfig["bits"]), GPTQ_FORMATS[fmt])
    if method == "awq":
        version = str(qconfig.get("version", qconfig.get("format", "gemm"))).lower()
        if version != "gemm" or not qconfig.get("zero_point", True):
            raise SystemExit(f"{src}: awq version {version!r} zero_point {qconfig.get('zero_point')} "
                             f"(only gemm with zero points is read)")
        bits, group = qconfig.get("bits", qconfig.get("w_bit")), qconfig.get("group_size", qconfig.get("q_group_size"))
        return dequantize_awq(_read_tensors(src), int(bits), int(group))
    if method == "compressed-tensors":
        return dequantize_compressed_tensors(src)
    if "fake" in packing or "fake" in str(qconfig.get("format", "")):
        return _read_tensors(src)
    raise SystemExit(f"{src}: unsupported quantization_config (quant_method={method!r}, packing_format={packing!r})")


def convert(src: Path, dst: Path, base: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    qconfig = config.pop("quantization_config", None)
    tensors = dequantized(src, qconfig) if qconfig else _read_tensors(src)
    want = _shapes(base)
    tied = json.loads((base / "config.json").read_text()).get("tie_word_embeddings", False)
    if tied:
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(want) - set(tensors))
    wrong = sorted(k for k in want if k in tensors and list(tensors[k].shape) != list(want[k]))
    if missing or wrong:
        raise SystemExit(f"{src}: missing tensors {missing[:5]}, wrong shapes {wrong[:5]}")
    out = {k: tensors[k].to(torch.float32).contiguous() for k in want}
    bad = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f"{src}: non-finite values in {bad[:5]}")
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt", "dequantized_from": str(src)})
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for name in SIDE_FILES:
        source = src / name if (src / name).exists() else base / name
        if source.exists():
            shutil.copy(source, dst / name)
    print(f"to_float: {src} -> {dst}: {len(out)} tensors ({'quantized: ' + str(qconfig.get('quant_method')) if qconfig else 'float'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--base", type=Path, default=Path(DEFAULT_BASE), help="float checkpoint giving names/shapes")
    args = parser.parse_args()
    convert(args.src, args.dst, args.base)


if __name__ == "__main__":
    main()
