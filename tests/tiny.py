"""Tiny random-weight checkpoints of each supported family, with a small BPE tokenizer.

Everything is built locally from configs (no Hub): fast enough to create per test session.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will more its also two first "
    "time new may only after years other any these such some over can most made city world river music game "
    "war king church house school film album song team season north south west east early century water"
).split()


def sample_text(n_words: int = 20000, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < n_words:
        k = rng.randint(5, 18)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + " .")
        count += k
    return "\n".join(sentences)


def make_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample_text().splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


# Gemma scales queries by query_pre_attn_scalar, llama.cpp by the head size: equal here, as in the real models;
# a window of 8 tokens makes sliding-window blocks differ from full-attention ones on short samples
GEMMA = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8}
FAMILY_EXTRA = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                "logits_scaling": 4.0},
    "gemma2": GEMMA,
    "gemma3_text": {**GEMMA, "layer_types": ["sliding_attention", "full_attention"]},
    "olmo2": {},
    "phi3": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16,
                  "norm_topk_prob": True},  # as the real Qwen3 MoE models (and llama.cpp) have it
    # block 0 dense, block 1 experts; latent attention of rank 32 (q) and 16 (kv)
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16, "n_group": 1, "topk_group": 1, "n_shared_experts": 1},
}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"}
NO_GGUF: set[str] = set()  # families whose GGUF export is not written
TIED = {"gemma2", "gemma3_text"}  # llama.cpp's Gemma has no output tensor: these families always tie it


def make_config(model_type: str = "llama", vocab_size: int = 384, hidden: int = 64, layers: int = 2,
                intermediate: int = 96, heads: int = 4, kv_heads: int = 2, tie: bool | None = None, **extra):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        model_type, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512, tie_word_embeddings=model_type in TIED if tie is None else tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        **{**FAMILY_EXTRA[model_type], **extra},
    )


def make_tiny_model(path: Path, model_type: str = "llama", seed: int = 0, dtype=torch.float32, **config_kw) -> Path:
    """Write a random-weight causal LM checkpoint (safetensors) plus tokenizer to `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = make_tokenizer()
    config = make_config(model_type, vocab_size=len(tok), **config_kw)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # larger-than-default weights so quantization error is visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's router bias, stored in the checkpoint
                b.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
