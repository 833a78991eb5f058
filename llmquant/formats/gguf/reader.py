"""Reading a GGUF file back: its description, and a transformers model of its dequantized weights.

The header is checked first (validate.py); tensor bytes are then memory-mapped and decoded by our
own block decoders. Config and tokenizer come from transformers' GGUF support, which reads the
same metadata llama.cpp does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ...errors import UserError, require_finite
from .mixes import MIXES
from ...numerics.ggml import CODECS
from .validate import GGUFSummary, check_gguf
from ...serving import gguf_runtimes
from ...models.adapters import adapter_for
from ...models.experts import expert_of
from .writer import PERMUTED, arch_of, gguf_name, heads_of, unpermute_rows


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def describe_gguf(path: str | Path) -> dict:
    """What `inspect` prints: architecture, mix, tensor types and bits per weight."""
    s = check_gguf(path)
    matrices = [t for t in s.tensors if len(t.shape) >= 2]
    weights = sum(int(np.prod(t.shape)) for t in matrices)
    types: dict[str, int] = {}
    for t in matrices:
        types[t.type] = types.get(t.type, 0) + 1
    ftype = s.metadata.get("general.file_type")
    mix = next((name for name, (ft, _) in MIXES.items() if ft == ftype), ftype)
    arch = s.metadata.get("general.architecture")
    return {"path": str(path), "format": "gguf", "version": s.version, "architecture": arch,
            "name": s.metadata.get("general.name"), "mix": mix, "tensors": len(s.tensors),
            "tensor_types": types, "quantized_weights": weights,
            "bpw": 8 * sum(t.nbytes for t in matrices) / max(weights, 1), "size_bytes": s.file_size,
            "blocks": s.metadata.get(f"{arch}.block_count"), "tokenizer": s.metadata.get("tokenizer.ggml.model"),
            "quantized_by": s.metadata.get("general.quantized_by"),
            "serving": [r.to_dict() for r in gguf_runtimes()]}


def _tensor(mm: np.memmap, summary: GGUFSummary, info) -> torch.Tensor:
    """Float32 values of one tensor in torch order ([rows, row length])."""
    start = summary.data_offset + info.offset
    raw = torch.from_numpy(np.array(mm[start:start + info.nbytes]))
    kind = GGMLQuantizationType[info.type]
    if kind.name not in CODECS:
        raise UserError(f"{summary.metadata.get('general.name')}: tensor {info.name} has type {kind.name}, "
                        f"which llmquant cannot decode")
    n = info.shape[0]
    rows = info.nbytes // (n // GGML_QUANT_SIZES[kind][0] * GGML_QUANT_SIZES[kind][1])
    values = CODECS[kind.name].dequantize(raw.reshape(rows, -1), n)
    return values.reshape(tuple(reversed(info.shape)))


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(transformers model with the file's weights decoded by our codecs, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    summary = check_gguf(path)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: transformers cannot build a model from this GGUF "
                        f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    adapter = adapter_for(config.model_type)
    arch = arch_of(adapter)
    # transformers' GGUF config mapping drops key_length; Qwen3 heads are not hidden / heads wide
    head_dim = summary.metadata.get(f"{summary.metadata.get('general.architecture')}.attention.key_length")
    if head_dim:
        config.head_dim = head_dim
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter.prepare(model)  # MoE: one linear per expert, each a slice of the file's 3D tensor
    by_name = {t.name: t for t in summary.tensors}
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    state, decoded = {}, {}
    for hf, meta in model.state_dict().items():
        if hf == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        if hf.endswith("rotary_emb.inv_freq"):
            continue
        name = gguf_name(hf, arch, config.num_hidden_layers, adapter)
        if name not in by_name:
            raise UserError(f"{path}: tensor {name} (for {hf}) is missing")
        if name not in decoded:
            decoded = {name: _tensor(mm, summary, by_name[name])}  # experts: decoded once for all of them
        values = decoded[name]
        expert = expert_of(hf)
        if expert is not None:  # one expert's slice of the 3D tensor
            values = values[expert[1]]
        require_finite(values, path, name)
        heads = heads_of(hf, config)
        if heads is not None and arch in PERMUTED:
            values = unpermute_rows(values, heads)
        if adapter.norm_offset and hf.endswith("norm.weight"):
            values = values - adapter.norm_offset  # stored as offset + w (writer.stored_value)
        if values.shape != meta.shape:
            raise UserError(f"{path}: tensor {name} has shape {tuple(values.shape)}, expected {tuple(meta.shape)}")
        state[hf] = values.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    rotary = model.model.rotary_emb  # its inv_freq is computed, not stored: build it for real
    model.model.rotary_emb = type(rotary)(config=config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"{path}: no tensor for {left[0]}")
    return model.eval(), tokenizer
