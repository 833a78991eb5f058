"""Reading a GGUF file back: its description, and a transformers model of its weights.

The header is checked first (validate.py); each tensor's bytes are then read and either decoded by our
own block decoders (float32, for quality measurements) or, for CPU inference, kept in their blocks:
linears and the embedding table become nn/cpu.py's packed modules. Config and tokenizer come from
transformers' GGUF support, which reads the same metadata llama.cpp does.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from ...errors import UserError, require_finite
from .mixes import MIXES
from ...nn.cpu import BlockEmbedding, block_linear
from ...numerics.ggml import CODECS, FLOAT, BlockTensor
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


# keys transformers' GGUF config mapping drops (the writer's) -> the config attributes they set, where the
# family's config has them: Qwen3's heads are not hidden / heads wide, and MoE widths and counts
_DROPPED_KEYS = {
    "attention.key_length": ("head_dim",),
    "expert_count": ("num_experts", "num_local_experts", "n_routed_experts"),
    "expert_used_count": ("num_experts_per_tok",),
    "expert_feed_forward_length": ("moe_intermediate_size",),
    "expert_shared_feed_forward_length": ("shared_expert_intermediate_size",),
}


def _complete_config(config, metadata: dict) -> None:
    arch = metadata.get("general.architecture")
    for key, attributes in _DROPPED_KEYS.items():
        value = metadata.get(f"{arch}.{key}")
        for attribute in attributes:
            if value and (attribute == "head_dim" or hasattr(config, attribute)):
                setattr(config, attribute, value)


def _blocks(file: BinaryIO, summary: GGUFSummary, info) -> BlockTensor:
    """One tensor's bytes as rows in torch order ([..., rows, row bytes]). Read, not memory-mapped: a map's
    pages, once touched, stay resident with the model's own copy."""
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    file.seek(summary.data_offset + info.offset)
    if file.readinto(memoryview(raw.numpy())) != info.nbytes:
        raise UserError(f"{file.name}: tensor {info.name} runs past the end of the file")
    kind = GGMLQuantizationType[info.type]
    if kind.name not in CODECS:
        raise UserError(f"{summary.metadata.get('general.name')}: tensor {info.name} has type {kind.name}, "
                        f"which llmquant cannot decode")
    n = info.shape[0]
    row_bytes = n // GGML_QUANT_SIZES[kind][0] * GGML_QUANT_SIZES[kind][1]
    return BlockTensor(kind, raw.reshape(*reversed(info.shape[1:]), row_bytes), n)


def _packed_module(module: nn.Module, weight: BlockTensor, dtype: torch.dtype, path: Path, name: str) -> nn.Module:
    """The nn/cpu.py module that computes with `weight`'s blocks in place of `module`; no inf or NaN scale
    (a file could hold anything) gets into the model."""
    if isinstance(module, nn.Embedding):  # its rows are decoded only when looked up: check its scales now
        _, scale, base = CODECS[weight.type.name].affine(weight.data, weight.in_features, torch.int8)
        for part in (scale, base):
            if part is not None:
                require_finite(part, path, name)
        return BlockEmbedding(weight, dtype, getattr(module, "scalar_embed_scale", None))
    packed = block_linear(weight, None if module.bias is None else module.bias.detach())
    for buffer in packed.buffers():
        if buffer.is_floating_point():
            require_finite(buffer, path, name)
    return packed


def _read_tensors(path: Path, summary: GGUFSummary, model: nn.Module, adapter, arch: str, packed: bool,
                  dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, BlockTensor]]:
    """(float tensors for load_state_dict, and with `packed` the file blocks of each quantized linear and
    embedding table by module name), every shape checked against the model's."""
    config = model.config
    by_name = {t.name: t for t in summary.tensors}
    tied = getattr(config, "tie_word_embeddings", False)
    modules = dict(model.named_modules())
    state, blocks, read = {}, {}, {}
    with open(path, "rb") as file:
        for hf, meta in model.state_dict().items():
            if (hf == "lm_head.weight" and tied) or hf.endswith("rotary_emb.inv_freq"):
                continue
            name = gguf_name(hf, arch, config.num_hidden_layers, adapter)
            if name not in by_name:
                raise UserError(f"{path}: tensor {name} (for {hf}) is missing")
            if name not in read:
                read = {name: _blocks(file, summary, by_name[name])}  # experts: read once for all of them
            weight = read[name]
            expert = expert_of(hf)
            if expert is not None:  # one expert's slice of the 3D tensor
                weight = BlockTensor(weight.type, weight.data[expert[1]], weight.in_features)
            heads = heads_of(hf, config)
            if heads is not None and arch in PERMUTED:  # rows are independent: permuting bytes permutes values
                weight = BlockTensor(weight.type, unpermute_rows(weight.data, heads), weight.in_features)
            shape = (*weight.data.shape[:-1], weight.in_features)
            if shape != tuple(meta.shape):
                raise UserError(f"{path}: tensor {name} has shape {shape}, expected {tuple(meta.shape)}")
            owner, _, kind = hf.rpartition(".")
            if packed and kind == "weight" and weight.type not in FLOAT and isinstance(modules[owner],
                                                                                         (nn.Linear, nn.Embedding)):
                blocks[owner] = BlockTensor(weight.type, weight.data.contiguous(), weight.in_features)
                continue
            values = weight.dequantize()
            require_finite(values, path, name)
            if adapter.norm_offset and hf.endswith("norm.weight"):
                values = values - adapter.norm_offset  # stored as offset + w (writer.stored_value)
            state[hf] = values.to(dtype)
    return state, blocks


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, packed: bool = False):
    """(transformers model, tokenizer). packed=False: every weight decoded to `dtype` by our codecs (exact,
    for quality measurements). packed=True (CPU inference): quantized linears and embedding tables stay in
    their blocks (nn/cpu.py), so the model holds about the file's bytes; the rest is `dtype`."""
    from accelerate import init_empty_weights
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
    _complete_config(config, summary.metadata)
    with init_empty_weights(include_buffers=False):  # computed buffers (rotary tables, embed_scale) for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter.prepare(model)  # MoE: one linear per expert, each a slice of the file's 3D tensor
    state, blocks = _read_tensors(path, summary, model, adapter, arch, packed, dtype)
    tied = getattr(config, "tie_word_embeddings", False)
    modules = dict(model.named_modules())
    model.load_state_dict(state, strict=False, assign=True)
    embedding = next(n for n, m in modules.items() if m is model.get_input_embeddings())
    if tied and embedding in blocks:  # the output layer computes with the table's blocks too
        blocks["lm_head"] = blocks[embedding]
    elif tied:
        model.tie_weights()
    for owner in list(blocks):  # each file tensor's bytes go once its module holds them its own way
        weight = blocks.pop(owner)
        parent, _, child = owner.rpartition(".")
        setattr(model.get_submodule(parent), child, _packed_module(modules[owner], weight, dtype, path, owner))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"{path}: no tensor for {left[0]}")
    return model.eval(), tokenizer
