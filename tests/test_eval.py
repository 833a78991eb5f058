import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmquant.errors import UserError
from llmquant.eval import evaluate, token_windows
from tiny import sample_text

SEQLEN, WINDOWS = 64, 3


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def perturbed(tiny_model_dir):
    noisy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return noisy


@pytest.fixture(scope="module")
def text():
    return sample_text(2000)


def test_ppl_matches_transformers_loss(model, tokenizer, text):
    result = evaluate(model, tokenizer, text, seqlen=SEQLEN, windows=WINDOWS, progress=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: WINDOWS * SEQLEN]).view(WINDOWS, SEQLEN)
    with torch.no_grad():
        total = sum(model(w[None], labels=w[None]).loss.item() * (SEQLEN - 1) for w in windows)
    expected_nll = total / (WINDOWS * (SEQLEN - 1))
    assert result.nll == pytest.approx(expected_nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected_nll), rel=1e-5)
    assert result.kld is None and result.top1 is None


def test_model_against_itself(model, tokenizer, text):
    result = evaluate(model, tokenizer, text, seqlen=SEQLEN, windows=WINDOWS, base=model, progress=False)
    assert abs(result.kld) < 1e-6
    assert result.top1 == 1.0


def test_kld_matches_per_position_reference(model, perturbed, tokenizer, text):
    result = evaluate(perturbed, tokenizer, text, seqlen=SEQLEN, windows=WINDOWS, base=model, progress=False)
    windows = token_windows(tokenizer, text, SEQLEN, WINDOWS)
    kls, agree = [], []
    with torch.no_grad():
        for w in windows:
            base_logits = model(w[None]).logits[0, :-1]
            model_logits = perturbed(w[None]).logits[0, :-1]
            for b, m in zip(base_logits, model_logits):
                kls.append(F.kl_div(F.log_softmax(m, -1), F.softmax(b, -1), reduction="sum").item())
                agree.append(bool(b.argmax() == m.argmax()))
    assert result.kld > 1e-4
    assert result.kld == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert result.top1 == pytest.approx(sum(agree) / len(agree))
    assert result.top1 < 1.0
    assert result.ppl != pytest.approx(evaluate(model, tokenizer, text, SEQLEN, WINDOWS, progress=False).ppl)


def test_bf16_model_is_scored_in_float32(model, tiny_model_dir, tokenizer, text):
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    result = evaluate(bf16, tokenizer, text, seqlen=SEQLEN, windows=WINDOWS, base=model, progress=False)
    reference = evaluate(model, tokenizer, text, seqlen=SEQLEN, windows=WINDOWS, progress=False)
    assert result.ppl == pytest.approx(reference.ppl, rel=0.05)
    assert 0 < result.kld < 0.05
    assert result.top1 > 0.8


def test_windows_and_seqlen_are_honoured(model, tokenizer, text):
    result = evaluate(model, tokenizer, text, seqlen=32, windows=5, progress=False)
    assert (result.windows, result.tokens) == (5, 5 * 31)
    assert result.to_dict()["tokens"] == 155


def test_short_text_gives_fewer_windows(model, tokenizer):
    text = sample_text(60)
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    result = evaluate(model, tokenizer, text, seqlen=32, windows=1000, progress=False)
    assert result.windows == n_tokens // 32 >= 1
    assert result.tokens == result.windows * 31


def test_too_short_text_is_a_user_error(model, tokenizer):
    text = "the city"
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(UserError) as info:
        evaluate(model, tokenizer, text, seqlen=SEQLEN, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert f"{n_tokens} tokens" in message and str(SEQLEN) in message


def test_seqlen_beyond_model_positions_is_a_user_error(model, tokenizer, text):
    with pytest.raises(UserError, match="512"):
        evaluate(model, tokenizer, text, seqlen=513, progress=False)
