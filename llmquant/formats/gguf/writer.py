"""A GGUF v3 file llama.cpp runs with nothing else: hyperparameters, tokenizer, tensors.

Names come from the `gguf` package's tensor-name maps; keys from its writer. What this module
adds is the knowledge of how a Hugging Face checkpoint maps onto llama.cpp's conventions: the
Llama family stores q/k rows in rotary-pair order (`permute_rows`), tied embeddings are written
once as token_embd, and the BPE pre-tokenizer is named so llama.cpp splits text as the HF
tokenizer does.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ...errors import UserError
from ...models.adapters import ADAPTERS, ArchAdapter
from ...models.experts import merged_name
from ...numerics.ggml import CODECS

# archs whose rotary q/k rows llama.cpp expects interleaved (the others rotate halves, as transformers does)
PERMUTED = {gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.GRANITE}

# llama.cpp's pre-tokenizer names for the split regexes HF tokenizers use (llama-vocab.cpp)
_SPLIT_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}


@dataclass
class Tensor:
    """One tensor as it goes into the file: GGUF name, block type, and its bytes (or float values)."""

    name: str
    type: gguf.GGMLQuantizationType
    data: np.ndarray  # uint8 [rows, row bytes] (or [bytes] for a vector), as the block codecs encode it


def arch_of(adapter: ArchAdapter) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for a family, as its adapter declares it."""
    name, model_type = adapter.gguf_arch, adapter.family
    if not name and model_type in ADAPTERS:
        raise UserError(f"GGUF export of family '{model_type}' is not written yet (llama.cpp's layout for it differs "
                        f"from the checkpoint's); use --format gptq or awq")
    if not name:
        raise UserError(f"GGUF export needs a declared family: '{model_type}' was inspected, not declared, and what "
                        f"llama.cpp needs to run it is not known; use --format gptq or awq")
    try:
        return gguf.MODEL_ARCH[name.upper()]
    except KeyError:
        raise UserError(f"GGUF export does not know architecture '{name}' of family '{model_type}'") from None


@functools.cache
def _name_map(arch: gguf.MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_blocks)  # builds thousands of patterns: once per model


def gguf_name(hf_name: str, arch: gguf.MODEL_ARCH, n_blocks: int, adapter: ArchAdapter) -> str:
    """'model.layers.3.self_attn.v_proj.weight' -> 'blk.3.attn_v.weight'. Every expert's projection maps to
    the one 3D tensor llama.cpp keeps all experts of a block in ('blk.3.ffn_gate_exps.weight')."""
    hf_name = merged_name(adapter.to_disk(hf_name))
    base, _, suffix = hf_name.rpartition(".")
    if suffix.endswith("_bias"):  # DeepSeek's router bias: mlp.gate.e_score_correction_bias
        base, suffix = f"{base}.{suffix.removesuffix('_bias')}", "bias"
    mapped = _name_map(arch, n_blocks).get_name(base)
    if mapped is None:
        raise UserError(f"no GGUF name for tensor '{hf_name}' in a {gguf.MODEL_ARCH_NAMES[arch]} model")
    return f"{mapped}.{suffix}"


def by_tensor(names: dict[str, str]) -> dict[str, list[str]]:
    """GGUF name -> the HF tensors it holds, in file order: one, or every expert of a projection (stacked)."""
    parts: dict[str, list[str]] = {}
    for hf, g in names.items():
        parts.setdefault(g, []).append(hf)
    return parts


def permute_rows(rows: torch.Tensor | np.ndarray, heads: int):
    """HF keeps each head's rotary halves apart ([x0..x31, y0..y31]); llama.cpp's LLAMA rope wants the
    pairs adjacent ([x0, y0, x1, y1, ...]). Works on float rows and on encoded block rows alike."""
    n = rows.shape[0]
    out = rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:])
    out = out.swapaxes(1, 2) if isinstance(out, np.ndarray) else out.transpose(1, 2)
    return out.reshape(rows.shape)


def unpermute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def heads_of(hf_name: str, config) -> int | None:
    """Rows of q_proj/k_proj are per-head rotary pairs: the head count to permute them by."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return config.num_attention_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def stored_value(hf_name: str, value: torch.Tensor, adapter: ArchAdapter) -> torch.Tensor:
    """What llama.cpp reads for a float tensor: a norm computing x * (offset + w) is stored as offset + w."""
    return value + adapter.norm_offset if adapter.norm_offset and hf_name.endswith("norm.weight") else value


def _rope(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope = dict(rope.get("full_attention", rope))  # per layer type (Gemma 3): the global layers' settings
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def llama3_rope_factors(config) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling, which llama.cpp reads from a rope_freqs tensor."""
    rope = _rope(config)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    old = rope["original_max_position_embeddings"]
    low, high, factor = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
    factors = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def add_hyperparameters(w: gguf.GGUFWriter, config, adapter: ArchAdapter) -> list[Tensor]:
    """Architecture keys (Llama's, then the family's own); returns extra tensors the rope scaling needs
    (rope_freqs)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    attention = {"head_count_kv": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                 "key_length": head_dim, "value_length": head_dim, "rope_dimension_count": head_dim}
    attention.update(adapter.gguf_attention(config) if adapter.gguf_attention else {})
    w.add_head_count_kv(attention["head_count_kv"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_key_length(attention["key_length"])
    w.add_value_length(attention["value_length"])
    w.add_rope_dimension_count(attention["rope_dimension_count"])
    rope = _rope(config)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if adapter.n_experts:
        w.add_expert_count(adapter.n_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(config.moe_intermediate_size)
        if getattr(config, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if adapter.gguf_keys is not None:
        adapter.gguf_keys(w, config)
    kind = rope["rope_type"]
    if kind == "default":
        return []
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
        return []
    if kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        return []
    if kind == "llama3":
        factors = llama3_rope_factors(config).view(np.uint8)
        return [Tensor("rope_freqs.weight", gguf.GGMLQuantizationType.F32, factors)]
    raise UserError(f"GGUF export does not support rope scaling '{kind}' yet")


def _bpe_pre(tok: dict) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern in _SPLIT_PRE:
            return _SPLIT_PRE[pattern]
    raise UserError(f"GGUF export does not recognise this tokenizer's pre-tokenizer ({kinds}); llama.cpp would "
                    f"split text differently from the HF tokenizer")


def add_tokenizer(w: gguf.GGUFWriter, model_dir: Path, tokenizer, vocab_size: int) -> None:
    """Vocabulary, token types, merges, special tokens and chat template from the HF tokenizer (loaded from
    `model_dir`) and its files."""
    path = model_dir / "tokenizer.json"
    if (model_dir / "tokenizer.model").exists():  # SentencePiece: llama.cpp merges by the model's scores
        _add_sentencepiece(w, model_dir)
    elif path.exists():
        _add_byte_level_bpe(w, model_dir, tokenizer, json.loads(path.read_text(encoding="utf-8")), vocab_size)
    else:
        raise UserError(f"GGUF export needs {path} or tokenizer.model in {model_dir}")
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)


def _add_sentencepiece(w: gguf.GGUFWriter, model_dir: Path) -> None:
    try:
        vocab = gguf.vocab.SentencePieceVocab(model_dir)
    except ImportError:
        raise UserError("this model's tokenizer is SentencePiece: pip install sentencepiece") from None
    tokens, scores, types = zip(*vocab.all_tokens())
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types(list(types))


def _add_byte_level_bpe(w: gguf.GGUFWriter, model_dir: Path, tokenizer, tok_json: dict, vocab_size: int) -> None:
    model = tok_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"GGUF export supports byte-level BPE or SentencePiece tokenizers; {model_dir} has "
                        f"{model.get('type')}{' with byte fallback but no tokenizer.model' * bool(model.get('byte_fallback'))}")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:  # embedding rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL if text not in added
                         else gguf.TokenType.CONTROL if added[text].special else gguf.TokenType.USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_bpe_pre(tok_json))
    w.add_token_list(tokens)
    w.add_token_types(types)


class GGUFSink:
    """One GGUF file written as the blocks finish. Every tensor's name, type and size is known from the
    model's shapes and the mix before the first block, so the header and tensor infos are written first;
    then each tensor's bytes in file order as they become available: the embedding (read through `read`)
    at once, each block's tensors when the block is done (quantized ones as the solver encoded them, the
    rest encoded here), the final norm and output at the end; `outside` names the tensors outside the
    blocks, which are read when their turn comes. At most one block is held."""

    def __init__(self, path: Path, config, adapter: ArchAdapter, model_dir: Path, tokenizer,
                 state: dict[str, torch.Tensor], types: dict[str, gguf.GGMLQuantizationType], names: dict[str, str],
                 file_type: int, read, outside: set[str]):
        self.config, self.names, self.types, self.read, self.outside = config, names, types, read, outside
        self.adapter, self.arch = adapter, arch_of(adapter)
        self.parts = by_tensor(names)
        self.order = list(self.parts)  # GGUF names in file order
        self.ready: dict[str, torch.Tensor] = {}
        self.params = sum(state[hf].numel() for hf in names)
        self.weight_bytes = 0
        w = self.writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[self.arch])
        # general.*: name, base name, size label, fine-tune, license... from the checkpoint's card and config
        provenance = gguf.Metadata.load(model_path=model_dir, total_params=self.params)
        provenance.quantized_by = "llmquant"
        provenance.set_gguf_meta_model(w)
        extra = add_hyperparameters(w, config, adapter)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(w, model_dir, tokenizer, config.vocab_size)
        for t in extra:
            w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.type)
        total = 0
        for g, parts in self.parts.items():
            kind, shape = types[g], tuple(state[parts[0]].shape)
            row = gguf.quant_shape_to_byte_shape(shape, kind) if len(shape) > 1 else (shape[0] * _type_bytes(kind),)
            row = (len(parts), *row) if len(parts) > 1 else row  # experts: one [E, rows, row bytes] tensor
            w.add_tensor_info(g, row, np.dtype(np.uint8), math.prod(row), raw_dtype=kind)
            total += math.prod(row)
        free = shutil.disk_usage(Path(path).parent).free
        if free < total:  # fail before the work, not when the disk fills
            raise UserError(f"writing {path} needs about {total / 2**30:.2f} GiB; {free / 2**30:.2f} GiB are free")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in extra:
            w.write_tensor_data(t.data)
        self._drain()

    def write_block(self, index: int, quantized: dict, floats: dict[str, torch.Tensor]) -> None:
        """The block's tensors, quantized (BlockTensors by module name) and float (by tensor name)."""
        self.ready.update({f"{name}.weight": qw.data for name, qw in quantized.items()})
        self.ready.update({name: self._encode(name, value) for name, value in floats.items() if name in self.names})
        self._drain()

    def _encode(self, hf: str, value: torch.Tensor) -> torch.Tensor:
        return CODECS[self.types[self.names[hf]].name].quantize(stored_value(hf, value.float(), self.adapter))

    def _drain(self) -> None:
        """Write every tensor whose turn has come and whose bytes exist; tensors outside the blocks are read."""
        while self.order:
            parts = self.parts[self.order[0]]
            if not all(hf in self.ready or hf in self.outside for hf in parts):
                return
            pieces = []
            for hf in parts:
                data = self.ready.pop(hf) if hf in self.ready else self._encode(hf, self.read(hf))
                heads = heads_of(hf, self.config)
                if heads is not None and self.arch in PERMUTED:
                    data = permute_rows(data, heads)
                pieces.append(data.contiguous())
            array = (pieces[0] if len(pieces) == 1 else torch.stack(pieces)).numpy()
            self.writer.write_tensor_data(array)
            self.weight_bytes += array.nbytes
            self.order.pop(0)

    def finish(self, report: dict | None = None) -> None:
        self._drain()
        if self.order:
            raise ValueError(f"GGUF tensor '{self.order[0]}' was never written")
        self.writer.close()

    def abort(self) -> None:
        self.writer.close()

    @property
    def bpw(self) -> float:
        return 8 * self.weight_bytes / self.params


def _type_bytes(kind: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return size // block
