"""Where each architecture keeps what the quantizer needs: blocks, linears in solve order, AWQ pairs.

One `ArchAdapter` per family. Linear names are relative to a decoder block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import UserError

ATTN_QKV = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
ATTN_OUT = ["self_attn.o_proj"]
MLP_IN = ["mlp.gate_proj", "mlp.up_proj"]
MLP_OUT = ["mlp.down_proj"]


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    # "true sequential" order: each group is solved seeing the quantized outputs of the groups before it;
    # the linears of a group read the same input, so calibration statistics are gathered once per group
    sequential: tuple[tuple[str, ...], ...] = (tuple(ATTN_QKV), tuple(ATTN_OUT), tuple(MLP_IN), tuple(MLP_OUT))
    # AWQ scaling pairs: (previous op whose output is scaled down, linears that read it and are scaled up)
    scaling_pairs: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("input_layernorm", tuple(ATTN_QKV)),
        ("self_attn.v_proj", tuple(ATTN_OUT)),
        ("post_attention_layernorm", tuple(MLP_IN)),
        ("mlp.up_proj", tuple(MLP_OUT)),
    )
    # block children that hold only linears of this block, and whose input is fixed once the linears of
    # the children before them are quantized: once their own are too, later passes replay their output
    replayable: tuple[str, ...] = ("self_attn", "mlp")
    # replayable child -> (its last linear, whether the child returns (output, attention weights)): the
    # child's output is that linear's output, so a replay computes it from the linear's recorded inputs
    tails: dict[str, tuple[str, bool]] = field(default_factory=lambda: {"self_attn": ("o_proj", True),
                                                                        "mlp": ("down_proj", False)})
    gguf_arch: str = "llama"
    extra: dict = field(default_factory=dict)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def block_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def linears(self) -> list[str]:
        return [name for group in self.sequential for name in group]


ADAPTERS: dict[str, ArchAdapter] = {
    "llama": ArchAdapter("llama"),
    "mistral": ArchAdapter("mistral"),
    "qwen2": ArchAdapter("qwen2", gguf_arch="qwen2"),
    "qwen3": ArchAdapter("qwen3", gguf_arch="qwen3"),
}


def adapter_for(model_type: str) -> ArchAdapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UserError(
            f"unsupported architecture '{model_type}'; supported families: {', '.join(sorted(ADAPTERS))}"
        ) from None
