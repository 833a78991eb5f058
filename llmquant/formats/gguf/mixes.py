"""Which block type each tensor of a GGUF file gets: llama.cpp's named mixes (Q4_K_M, ...).

The rules follow llama-quantize (src/llama-quant.cpp, `llama_tensor_get_type`) for the dense,
non-Falcon families we convert: a default type per mix, more bits for the sensitive tensors
(output, attn_v, ffn_down, attn_output) in some layers, `--tensor-type` overrides first, and a
fallback to a 32-wide type when a row is not a whole number of 256-wide super-blocks.
tests/test_gguf_mixes.py checks the outcome against llama-quantize itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from ...errors import UserError
from ...numerics.ggml import FLOAT  # stored as they are: no block rules, no fallback

# mix name -> (general.file_type, default block type)
MIXES: dict[str, tuple[F, T]] = {
    "Q2_K": (F.MOSTLY_Q2_K, T.Q2_K),
    "Q3_K_S": (F.MOSTLY_Q3_K_S, T.Q3_K),
    "Q3_K_M": (F.MOSTLY_Q3_K_M, T.Q3_K),
    "Q3_K_L": (F.MOSTLY_Q3_K_L, T.Q3_K),
    "Q4_0": (F.MOSTLY_Q4_0, T.Q4_0),
    "Q4_1": (F.MOSTLY_Q4_1, T.Q4_1),
    "Q4_K_S": (F.MOSTLY_Q4_K_S, T.Q4_K),
    "Q4_K_M": (F.MOSTLY_Q4_K_M, T.Q4_K),
    "Q5_0": (F.MOSTLY_Q5_0, T.Q5_0),
    "Q5_1": (F.MOSTLY_Q5_1, T.Q5_1),
    "Q5_K_S": (F.MOSTLY_Q5_K_S, T.Q5_K),
    "Q5_K_M": (F.MOSTLY_Q5_K_M, T.Q5_K),
    "Q6_K": (F.MOSTLY_Q6_K, T.Q6_K),
    "Q8_0": (F.MOSTLY_Q8_0, T.Q8_0),
    "F16": (F.MOSTLY_F16, T.F16),
    "BF16": (F.MOSTLY_BF16, T.BF16),
    "F32": (F.ALL_F32, T.F32),
}

# a K-type row must be whole super-blocks of 256; otherwise llama.cpp takes this 32-wide type
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}

# what --target-bpw chooses among for a linear's tensor, as llama-quantize places them (rows permitting)
MIXED_TYPES = (T.Q2_K, T.Q3_K, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q8_0)

QUANTIZABLE = {t.name: t for t in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q6_K, T.Q5_K, T.Q5_1, T.Q5_0, T.Q4_K,
                                   T.Q4_1, T.Q4_0, T.Q3_K, T.Q2_K)}




def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def parse_overrides(items: list[str] | None) -> list[tuple[re.Pattern, T]]:
    """`--tensor-type PATTERN=TYPE` items (regex searched in the GGUF tensor name, first match wins)."""
    overrides = []
    for item in items or []:
        pattern, sep, name = item.rpartition("=")
        if not sep or not pattern:
            raise UserError(f"--tensor-type wants PATTERN=TYPE (e.g. attn_v=Q8_0), not '{item}'")
        if name.upper() not in QUANTIZABLE:
            raise UserError(f"--tensor-type {item}: unknown type '{name}'; choose one of {', '.join(QUANTIZABLE)}")
        try:
            overrides.append((re.compile(pattern), QUANTIZABLE[name.upper()]))
        except re.error as err:
            raise UserError(f"--tensor-type {item}: bad pattern ({err})") from None
    return overrides


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class TensorInfo:
    name: str  # GGUF name, e.g. blk.3.attn_v.weight
    shape: tuple[int, ...]  # torch order: (rows, row length)


ATTN_V = ("attn_v", "attn_qkv", "attn_kv_b")  # what llama-quantize treats as attention values (DeepSeek's kv_b)


def _category(name: str) -> str:
    if name in ("output.weight", "token_embd.weight"):
        return name.split(".")[0]
    for part in ("attn_qkv.weight", "attn_v.weight", "attn_kv_b.weight", "attn_k.weight", "attn_q.weight",
                 "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):
        if part in name:
            return part.removesuffix(".weight")
    return "other"


def tensor_types(tensors: list[TensorInfo], mix: str, n_gqa: int, tied: bool, has_imatrix: bool = False,
                 overrides: list[tuple[re.Pattern, T]] = (), n_expert: int = 0) -> dict[str, T]:
    """The block type of every tensor in `tensors` (file order) under `mix`. With experts, a tensor's layer
    is read from its name (a block holds more than one ffn_down), and 8-expert models (Mixtral) keep
    attention at more bits, as llama-quantize does."""
    if mix not in MIXES:
        raise UserError(f"unknown GGUF type '{mix}'; choose one of {', '.join(MIXES)}")
    default = MIXES[mix][1]
    n_v = sum(_category(t.name) in ATTN_V for t in tensors)
    n_down = sum(_category(t.name) == "ffn_down" for t in tensors)
    n_layers = 1 + max((int(t.name.split(".")[1]) for t in tensors if t.name.startswith("blk.")), default=-1)
    i_v = i_down = 0
    out = {}
    for t in tensors:
        if len(t.shape) < 2 or not t.name.endswith("weight") or "_norm.weight" in t.name or \
                t.name.endswith("ffn_gate_inp.weight"):  # norms and routers stay float, as llama-quantize has it
            out[t.name] = T.F32
            continue
        cat = _category(t.name)
        new = default
        manual = next((ty for pattern, ty in overrides if pattern.search(t.name)), None)
        if default in FLOAT:
            pass
        elif manual is not None:
            new = manual
        elif cat == "output" or (tied and cat == "token_embd"):
            new = T.Q8_0 if t.shape[-1] % block_size(default) or default == T.Q8_0 else T.Q6_K
        elif cat == "token_embd":
            pass
        elif (cat in ATTN_V or cat == "attn_k") and n_expert == 8:
            new = T.Q8_0
            i_v += cat in ATTN_V
        elif cat in ATTN_V:
            new = _attn_v(mix, default, n_gqa, i_v, n_v, cat == "attn_qkv")
            i_v += 1
        elif cat == "ffn_down":
            layer, layers = (int(t.name.split(".")[1]), n_layers) if n_expert > 1 else (i_down, n_down)
            new = _ffn_down(mix, default, layer, layers, has_imatrix)
            i_down += 1
        elif cat == "attn_output" and n_expert == 8 and mix in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
            new = T.Q5_K
        elif cat == "attn_output":
            new = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(mix, default)
        out[t.name] = new if new in FLOAT else _fallback(new, t.shape[-1])
    return out


def _attn_v(mix: str, default: T, n_gqa: int, i: int, n: int, fused: bool) -> T:
    if fused:  # a fused qkv tensor
        return {"Q3_K_M": T.Q4_K, "Q3_K_L": T.Q4_K, "Q4_K_M": T.Q5_K, "Q5_K_M": T.Q6_K}.get(mix, default)
    if mix == "Q2_K":
        return T.Q4_K if n_gqa >= 4 else T.Q3_K
    if mix == "Q3_K_M":
        return T.Q5_K if i < 2 else T.Q4_K
    if mix == "Q3_K_L":
        return T.Q5_K
    if mix in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
        return T.Q6_K
    if mix == "Q4_K_S" and i < 4:
        return T.Q5_K
    return default


def _ffn_down(mix: str, default: T, i: int, n: int, has_imatrix: bool) -> T:
    if mix == "Q2_K":
        return T.Q3_K
    if mix == "Q3_K_M":
        return T.Q5_K if i < n // 16 else T.Q4_K
    if mix == "Q3_K_L":
        return T.Q5_K
    if mix in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
        return T.Q6_K
    if mix == "Q4_K_S" and i < n // 8:
        return T.Q5_K
    if mix in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
        return T.Q4_1 if mix == "Q4_0" else T.Q5_1
    return default


def _fallback(t: T, row: int) -> T:
    if row % block_size(t) == 0:
        return t
    t = _FALLBACK.get(t, t)
    return t if row % block_size(t) == 0 else T.F16
