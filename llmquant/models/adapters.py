"""Where each architecture keeps what the quantizer needs: blocks, linears in solve order, input-sharing
groups, AWQ scaling pairs and how to fold them, the replayable children, and its GGUF architecture.

One `ArchAdapter` per family, registered in `ADAPTERS`: adding a family is one entry here (plus, for GGUF,
whatever llama.cpp needs beyond the Llama keys: `gguf_keys`). Linear names are relative to a decoder block.
A family not registered here gets an adapter found by inspecting its first block (models/discover.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from torch import nn

from ..errors import UserError
from .experts import ExpertLayout, expert_count, unfuse

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
O = ("self_attn.o_proj",)
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
DOWN = ("mlp.down_proj",)

# How AWQ folds 1/s into the op before a scaling group (quant/awq.py: fold_scales):
SCALE = "scale"  # the op's output is its weight times something: divide the weight (rows of a linear)
OFFSET = "offset"  # a norm computing x * (1 + w) (Gemma): (1 + w) / s, so w becomes (1 + w) / s - 1
# a fused linear of n equal parts whose last part feeds the group: phi3's up in gate_up_proj (2), its v in
# qkv_proj (3: only without grouped-query attention are q, k and v equal, and only then can v be scaled alone)
LAST_OF_2, LAST_OF_3 = "last of 2", "last of 3"


class ScalingPair(NamedTuple):
    """AWQ: `previous`'s output is divided by s and the input columns of `readers` multiplied by s."""

    previous: str
    readers: tuple[str, ...]
    fold: str = SCALE


def _pairs(*items) -> tuple[ScalingPair, ...]:
    return tuple(ScalingPair(*item) for item in items)


LLAMA_PAIRS = _pairs(("input_layernorm", QKV), ("self_attn.v_proj", O), ("post_attention_layernorm", GATE_UP),
                     ("mlp.up_proj", DOWN))


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    # "true sequential" order: each group is solved seeing the quantized outputs of the groups before it;
    # the linears of a group read the same input, so calibration statistics are gathered once per group
    sequential: tuple[tuple[str, ...], ...] = (QKV, O, GATE_UP, DOWN)
    scaling_pairs: tuple[ScalingPair, ...] = LLAMA_PAIRS
    # block children that hold only linears of this block, and whose input is fixed once the linears of
    # the children before them are quantized: once their own are too, later passes replay their output
    replayable: tuple[str, ...] = ("self_attn", "mlp")
    # replayable child -> (its last linear, whether the child returns (output, attention weights)): the
    # child's output is that linear's output, so a replay computes it from the linear's recorded inputs
    tails: dict[str, tuple[str, bool]] = field(default_factory=lambda: {"self_attn": ("o_proj", True),
                                                                        "mlp": ("down_proj", False)})
    blocks_path: str = "model.layers"  # where the decoder blocks sit in the CausalLM
    gguf_arch: str = "llama"  # llama.cpp's architecture name (gguf.MODEL_ARCH)
    gguf_keys: Callable | None = None  # (GGUFWriter, config) -> None: keys llama.cpp needs beyond Llama's
    # config -> {head_count_kv, key_length, value_length, rope_dimension_count} where they are not Llama's
    gguf_attention: Callable | None = None
    norm_offset: float = 0.0  # norms compute x * (norm_offset + w): llama.cpp's files store the sum
    # mixture of experts: where the fused experts sit; `expand` adds their linears and AWQ pairs
    experts: ExpertLayout | None = None
    # (module prefix, checkpoint prefix) within a block where the two disagree (Mixtral's block_sparse_moe)
    renames: tuple[tuple[str, str], ...] = ()
    n_experts: int = 0  # experts a block, once expanded for a model (0: dense)
    # MoE families whose first blocks have a dense MLP (DeepSeek): the layout of those, and which they are
    dense: ArchAdapter | None = None
    dense_blocks: frozenset[int] = frozenset()

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def for_block(self, index: int) -> ArchAdapter:
        """The layout of block `index` (a dense block among MoE ones has its own)."""
        return self.dense if index in self.dense_blocks else self

    def pairs_at(self, prefix: str) -> tuple[ScalingPair, ...]:
        """The AWQ pairs of the block whose names start with `prefix`."""
        return self.for_block(int(prefix.removeprefix(self.blocks_path + ".").split(".")[0])).scaling_pairs

    def expand(self, count: int) -> ArchAdapter:
        """This MoE family with `count` experts a block: after the template's groups, every expert's gate/up
        (one group each), then every down; the experts' gate/up join the AWQ pair of the norm the router
        reads, and each expert's up -> down is a pair of its own."""
        first, second = self.experts.names(count)
        pairs = [p._replace(readers=p.readers + tuple(n for g in first for n in g)) if self.experts.router in p.readers
                 else p for p in self.scaling_pairs]
        pairs += [ScalingPair(g[1], d) for g, d in zip(first, second)]
        return replace(self, sequential=self.sequential + tuple(first) + tuple(second), scaling_pairs=tuple(pairs),
                       n_experts=count)

    def prepare(self, model: nn.Module) -> ArchAdapter:
        """The adapter for this model; for MoE, every block's fused experts are first swapped for one linear
        per projection (models/experts.py), and the adapter expanded to their count."""
        if self.experts is None:
            return self
        blocks, dense, count = self.blocks(model), set(), 0
        for index, block in enumerate(blocks):
            try:
                block.get_submodule(self.experts.path)
            except AttributeError:
                if self.dense is None:
                    raise UserError(f"block {index} of this {self.family} model has no experts at "
                                    f"{self.experts.path} (a dense layer among sparse ones), which its adapter does "
                                    f"not declare") from None
                dense.add(index)
                continue
            unfuse(block, self.experts)
            count = expert_count(block, self.experts)
        adapter = replace(self.expand(count), dense_blocks=frozenset(dense))
        for index, block in enumerate(blocks):
            for name in adapter.for_block(index).linears():
                try:
                    block.get_submodule(name)
                except AttributeError:
                    raise UserError(f"block {index} of this {self.family} model has no '{name}': a variant of the "
                                    f"family its adapter does not declare") from None
        return adapter

    def to_disk(self, name: str) -> str:
        """A full module/parameter name as the family's checkpoints spell it."""
        return self._rename(name, self.renames)

    def from_disk(self, name: str) -> str:
        return self._rename(name, tuple((disk, module) for module, disk in self.renames))

    def _rename(self, name: str, renames) -> str:
        for old, new in renames:
            name = re.sub(rf"^({re.escape(self.blocks_path)}\.\d+\.){re.escape(old)}", lambda m: m.group(1) + new, name)
        return name

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}."

    def linears(self) -> list[str]:
        return [name for group in self.sequential for name in group]


def _sliding_keys(w, config) -> None:
    """Which blocks attend within a window, and their rotary base when it is their own (Gemma 3)."""
    kinds = getattr(config, "layer_types", None) or ()
    if "sliding_attention" not in kinds:
        return
    w.add_sliding_window(config.sliding_window)
    w.add_sliding_window_pattern([kind == "sliding_attention" for kind in kinds])
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention")
    if local:
        w.add_rope_freq_base_swa(float(local["rope_theta"]))


def _gemma2_keys(w, config) -> None:
    w.add_attn_logit_softcapping(config.attn_logit_softcapping)
    w.add_final_logit_softcapping(config.final_logit_softcapping)
    _sliding_keys(w, config)


def _gemma3_keys(w, config) -> None:
    if getattr(config, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(config.final_logit_softcapping)
    _sliding_keys(w, config)


def _phi3_keys(w, config) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    w.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings", config.max_position_embeddings))
    w.add_sliding_window(getattr(config, "sliding_window", None) or 0)  # 0: llama.cpp's "no window"


def _top_k_normalised(expected: bool):
    """llama.cpp fixes per architecture whether the chosen experts' weights are renormalised: a checkpoint
    that differs would run differently there, so it is refused rather than written."""

    def keys(w, config) -> None:
        if bool(getattr(config, "norm_topk_prob", False)) != expected:
            raise UserError(f"llama.cpp's {config.model_type} always {'renormalises' if expected else 'keeps'} the "
                            f"chosen experts' weights, and this checkpoint has norm_topk_prob="
                            f"{getattr(config, 'norm_topk_prob', None)}: its GGUF would compute something else")

    return keys


def _deepseek_keys(w, config) -> None:
    """Latent attention written for llama.cpp's DeepSeek-2 without the absorbed form (kv_b_proj whole), and its
    routing: sigmoid scores, expert groups, renormalised and scaled top-k weights, shared experts."""
    import gguf

    w.add_leading_dense_block_count(config.first_k_dense_replace)
    w.add_q_lora_rank(config.q_lora_rank)
    w.add_kv_lora_rank(config.kv_lora_rank)
    w.add_expert_shared_count(config.n_shared_experts)
    w.add_expert_weights_scale(config.routed_scaling_factor)
    if config.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_group_count(config.n_group)
    w.add_expert_group_used_count(config.topk_group)
    if not getattr(config, "rope_interleave", True):
        raise UserError("llama.cpp's DeepSeek-2 rotates adjacent pairs; this checkpoint has rope_interleave=false")


def _deepseek_attention(config) -> dict:
    return {"head_count_kv": config.num_attention_heads, "key_length": config.qk_nope_head_dim + config.qk_rope_head_dim,
            "value_length": config.v_head_dim, "rope_dimension_count": config.qk_rope_head_dim}


def _granite_keys(w, config) -> None:
    w.add_attention_scale(config.attention_multiplier)
    w.add_embedding_scale(config.embedding_multiplier)
    w.add_residual_scale(config.residual_multiplier)
    w.add_logit_scale(config.logits_scaling)


# Gemma: four norms a block, the MLP reads the pre-feed-forward norm, and every norm scales by (1 + w)
GEMMA_PAIRS = _pairs(("input_layernorm", QKV, OFFSET), ("self_attn.v_proj", O),
                     ("pre_feedforward_layernorm", GATE_UP, OFFSET), ("mlp.up_proj", DOWN))

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": ArchAdapter("llama"),
    "mistral": ArchAdapter("mistral"),
    "qwen2": ArchAdapter("qwen2", gguf_arch="qwen2"),
    "qwen3": ArchAdapter("qwen3", gguf_arch="qwen3"),
    "granite": ArchAdapter("granite", gguf_arch="granite", gguf_keys=_granite_keys),
    "gemma2": ArchAdapter("gemma2", scaling_pairs=GEMMA_PAIRS, gguf_arch="gemma2", gguf_keys=_gemma2_keys,
                          norm_offset=1.0),
    "gemma3_text": ArchAdapter("gemma3_text", scaling_pairs=GEMMA_PAIRS, gguf_arch="gemma3", gguf_keys=_gemma3_keys,
                               norm_offset=1.0),
    # OLMo 2 normalises after attention and MLP, not before: q/k/v and gate/up read the residual stream itself
    "olmo2": ArchAdapter("olmo2", scaling_pairs=_pairs(("self_attn.v_proj", O), ("mlp.up_proj", DOWN)),
                         gguf_arch="olmo2"),
    # Phi-3 fuses q/k/v and gate/up into one linear each; v and up are their last rows
    "phi3": ArchAdapter(
        "phi3", sequential=(("self_attn.qkv_proj",), O, ("mlp.gate_up_proj",), DOWN),
        scaling_pairs=_pairs(("input_layernorm", ("self_attn.qkv_proj",)), ("self_attn.qkv_proj", O, LAST_OF_3),
                             ("post_attention_layernorm", ("mlp.gate_up_proj",)), ("mlp.gate_up_proj", DOWN, LAST_OF_2)),
        gguf_arch="phi3", gguf_keys=_phi3_keys),
    # mixtures of experts: the router stays in float; one AWQ scale over everything that reads the
    # post-attention norm (router, shared expert, every expert), one per expert for up -> down
    "mixtral": ArchAdapter(
        "mixtral", sequential=(QKV, O), tails={"self_attn": ("o_proj", True)},
        scaling_pairs=_pairs(("input_layernorm", QKV), ("self_attn.v_proj", O), ("post_attention_layernorm", ("mlp.gate",))),
        gguf_arch="llama", experts=ExpertLayout(leaves=("w1", "w3", "w2")), renames=(("mlp.", "block_sparse_moe."),)),
    "qwen2_moe": ArchAdapter(
        "qwen2_moe", sequential=(QKV, O, ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                                 ("mlp.shared_expert.down_proj",)), tails={"self_attn": ("o_proj", True)},
        scaling_pairs=_pairs(("input_layernorm", QKV), ("self_attn.v_proj", O),
                             ("post_attention_layernorm", ("mlp.gate", "mlp.shared_expert.gate_proj",
                                                           "mlp.shared_expert.up_proj", "mlp.shared_expert_gate")),
                             ("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",))),
        gguf_arch="qwen2moe", gguf_keys=_top_k_normalised(False), experts=ExpertLayout()),
    "qwen3_moe": ArchAdapter(
        "qwen3_moe", sequential=(QKV, O), tails={"self_attn": ("o_proj", True)},
        scaling_pairs=_pairs(("input_layernorm", QKV), ("self_attn.v_proj", O), ("post_attention_layernorm", ("mlp.gate",))),
        gguf_arch="qwen3moe", gguf_keys=_top_k_normalised(True), experts=ExpertLayout()),
    # DeepSeek V3: multi-head latent attention (q and kv through low-rank projections, each normalised before
    # its up-projection), a shared expert beside the routed ones, and dense MLPs in the first blocks. The value
    # rows of kv_b_proj are interleaved with the keys per head: no v -> o pair.
    "deepseek_v3": ArchAdapter(
        "deepseek_v3",
        sequential=(("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_b_proj",),
                    ("self_attn.kv_b_proj",), O, ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
                    ("mlp.shared_experts.down_proj",)),
        scaling_pairs=_pairs(("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
                             ("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
                             ("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)),
                             ("post_attention_layernorm", ("mlp.gate", "mlp.shared_experts.gate_proj",
                                                           "mlp.shared_experts.up_proj")),
                             ("mlp.shared_experts.up_proj", ("mlp.shared_experts.down_proj",))),
        tails={"self_attn": ("o_proj", True)}, gguf_arch="deepseek2", gguf_keys=_deepseek_keys,
        gguf_attention=_deepseek_attention, experts=ExpertLayout(),
        dense=ArchAdapter(
            "deepseek_v3", sequential=(("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_b_proj",),
                                       ("self_attn.kv_b_proj",), O, GATE_UP, DOWN),
            scaling_pairs=_pairs(("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
                                 ("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
                                 ("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)),
                                 ("post_attention_layernorm", GATE_UP), ("mlp.up_proj", DOWN)),
            gguf_arch="")),
}


def adapter_for(model_type: str, model: nn.Module | None = None) -> ArchAdapter:
    """The registered adapter of a family; for an unknown one, the adapter found by inspecting `model`'s first
    block (with a warning naming what was found), or one line naming the supported families without it.
    With `model`, the model is prepared for quantizing and loading (ArchAdapter.prepare: MoE experts unfused)."""
    if model_type in ADAPTERS:
        return ADAPTERS[model_type] if model is None else ADAPTERS[model_type].prepare(model)
    if model is not None:
        from .discover import discover

        return discover(model, model_type)
    raise UserError(f"unsupported architecture '{model_type}'; supported families: {', '.join(sorted(ADAPTERS))}")
