"""Quality of a (quantized) causal LM: perplexity, and KL divergence / top-1 agreement against the float base.

Follows DESIGN.md "Measurement protocol": the text is tokenized whole and cut into non-overlapping windows;
inside each window every token after the first is scored from its prefix. One window is on the device at a
time, because a window's logits alone are vocab x seqlen floats (49152 x 1024 x 4 bytes = 200 MB).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import UserError


@dataclass
class EvalResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    windows: int
    kld: float | None = None  # mean KL(base || model) per scored token (nats)
    top1: float | None = None  # fraction of positions where argmax(model) == argmax(base)
    base_ppl: float | None = None  # the base model's perplexity on the same windows

    def to_dict(self) -> dict:
        return asdict(self)


def _input_device(model) -> torch.device:
    """Where input ids must go; the embedding's device also holds for models dispatched across devices."""
    return model.get_input_embeddings().weight.device


def _log_probs(model, window: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [seqlen-1, vocab] in float32 (bf16 logits lose too much for a KL)."""
    logits = model(window.to(_input_device(model)).unsqueeze(0), use_cache=False).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def token_windows(tokenizer, text: str, seqlen: int, windows: int) -> torch.Tensor:
    """The first `windows` non-overlapping windows [n, seqlen] of the whole text's tokens (fewer if it is short)."""
    if seqlen < 2 or windows < 1:
        raise UserError(f"need seqlen >= 2 and windows >= 1, got seqlen={seqlen}, windows={windows}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = min(windows, len(ids) // seqlen)
    if n == 0:
        raise UserError(f"evaluation text has {len(ids)} tokens; one window needs {seqlen}")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


@torch.inference_mode()
def evaluate(model, tokenizer, text: str, seqlen: int = 1024, windows: int = 32, base=None,
             progress: bool = True) -> EvalResult:
    """Perplexity of `model` on `text`; with `base`, also KL(base || model) and top-1 agreement per position."""
    return evaluate_many({"model": model}, tokenizer, text, seqlen, windows, base, progress)["model"]


@torch.inference_mode()
def evaluate_many(models: dict, tokenizer, text: str, seqlen: int = 1024, windows: int = 32, base=None,
                  progress: bool = True) -> dict[str, EvalResult]:
    """`evaluate` for several models on the same windows: the base runs once per window for all of them."""
    for model in models.values():
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions is not None and seqlen > max_positions:
            raise UserError(f"seqlen {seqlen} is longer than the model's {max_positions} positions")
    batches = token_windows(tokenizer, text, seqlen, windows)
    for m in (*models.values(), base):
        if m is not None:
            m.eval()  # dropout would make the scores random
    sums = {name: {"nll": 0.0, "kld": 0.0, "agree": 0.0} for name in models}
    base_nll = 0.0
    for window in tqdm(batches, desc="eval", unit="window", disable=not progress):
        logp_base = None if base is None else _log_probs(base, window)
        if logp_base is not None:
            base_nll -= logp_base.gather(1, window[1:].to(logp_base.device).unsqueeze(1)).sum().item()
        for name, model in models.items():
            logp = _log_probs(model, window)
            targets = window[1:].to(logp.device)
            acc = sums[name]
            acc["nll"] -= logp.gather(1, targets.unsqueeze(1)).sum().item()
            if logp_base is not None:
                ref = logp_base.to(logp.device)
                if ref.shape != logp.shape:
                    raise UserError(f"base vocabulary {ref.shape[-1]} differs from the model's {logp.shape[-1]}")
                acc["kld"] += F.kl_div(logp, ref, reduction="sum", log_target=True).item()
                acc["agree"] += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
    tokens = batches.shape[0] * (seqlen - 1)
    return {
        name: EvalResult(
            ppl=math.exp(acc["nll"] / tokens), nll=acc["nll"] / tokens, tokens=tokens, windows=batches.shape[0],
            kld=None if base is None else acc["kld"] / tokens, top1=None if base is None else acc["agree"] / tokens,
            base_ppl=None if base is None else math.exp(base_nll / tokens),
        )
        for name, acc in sums.items()
    }


