import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmquant import calibration
from llmquant.calibration import load_recipe, load_samples, load_text, recipe_names, tokenize
from llmquant.errors import UserError
from tiny import sample_text

WIKITEXT_VALID = Path("/work/shared/data/wikitext2/valid.tokens.txt")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def documents():
    return [sample_text(300, seed=s) for s in range(6)]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, documents):
    path = tmp_path_factory.mktemp("calib") / "docs.txt"
    path.write_text("\n\n".join(documents), encoding="utf-8")
    return path


def user_error(call, *args, **kwargs) -> str:
    """The message of the UserError `call` raises, checked to be a single line."""
    with pytest.raises(UserError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def is_window_of(samples: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per sample: whether it equals some contiguous slice of `ids`."""
    windows = ids.unfold(0, samples.shape[1], 1)
    return torch.stack([(windows[windows[:, 0] == row[0]] == row).all(-1).any() for row in samples])


def test_windows_are_deterministic_contiguous_slices(tokenizer, text_file):
    ids = torch.tensor(tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"])
    samples = load_samples(str(text_file), tokenizer, n_samples=16, seqlen=32, seed=3)
    assert samples.shape == (16, 32) and samples.dtype == torch.long
    assert is_window_of(samples, ids).all()
    assert torch.equal(samples, load_samples(str(text_file), tokenizer, n_samples=16, seqlen=32, seed=3))
    assert not torch.equal(samples, load_samples(str(text_file), tokenizer, n_samples=16, seqlen=32, seed=4))
    assert len({tuple(row.tolist()) for row in samples}) > 8  # random starts, not one repeated window


def test_window_may_span_the_whole_text(tokenizer, text_file):
    ids = tokenize(text_file.read_text(), tokenizer)
    samples = load_samples(str(text_file), tokenizer, n_samples=3, seqlen=ids.numel())
    assert torch.equal(samples, ids.expand(3, -1))


def test_txt_jsonl_parquet_give_the_same_tokens(tokenizer, documents, text_file, tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(documents)))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": documents, "id": list(range(len(documents)))}), parquet)
    expected = text_file.read_text()
    assert load_text(str(jsonl)) == expected and load_text(str(parquet)) == expected
    reference = load_samples(str(text_file), tokenizer, n_samples=8, seqlen=64, seed=1)
    for path in (jsonl, parquet):
        assert torch.equal(load_samples(str(path), tokenizer, n_samples=8, seqlen=64, seed=1), reference)


def test_chunked_tokenization_matches_whole_text(tokenizer, monkeypatch):
    text = sample_text(6000, seed=5)
    whole = tokenize(text, tokenizer)
    assert torch.equal(whole, torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]))
    monkeypatch.setattr(calibration, "TOKENIZE_CHUNK_CHARS", 2000)
    assert len(calibration._line_chunks(text, 2000)) > 10
    assert torch.equal(tokenize(text, tokenizer), whole)


def test_bad_sizes_are_user_errors(tokenizer, text_file):
    n_tokens = tokenize(text_file.read_text(), tokenizer).numel()
    message = user_error(load_samples, str(text_file), tokenizer, n_samples=4, seqlen=n_tokens + 1)
    assert str(n_tokens) in message and str(n_tokens + 1) in message
    assert "4096" in user_error(load_samples, str(text_file), tokenizer, n_samples=0, seqlen=8)
    assert "5000" in user_error(load_samples, str(text_file), tokenizer, n_samples=5000, seqlen=8)
    assert "0" in user_error(load_samples, str(text_file), tokenizer, n_samples=4, seqlen=0)


def test_bad_sources_are_user_errors(tokenizer, tmp_path):
    missing = tmp_path / "absent.txt"
    assert str(missing) in user_error(load_samples, str(missing), tokenizer)
    message = user_error(load_samples, "wikitext3", tokenizer)
    assert "wikitext3" in message and "wikitext2" in message and "self" in message
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    message = user_error(load_text, str(csv))
    assert "data.csv" in message and ".jsonl" in message
    assert "absent.txt" in user_error(load_text, str(tmp_path / "absent.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n \n")
    assert "no text" in user_error(load_text, str(empty))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ok \xff\xfe")
    assert "UTF-8" in user_error(load_text, str(binary))
    wrong_field = tmp_path / "wrong.jsonl"
    wrong_field.write_text('{"content": "a"}\n{"content": "b"}\n')
    message = user_error(load_text, str(wrong_field))
    assert "'text'" in message and "content" in message
    wrong_column = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), wrong_column)
    message = user_error(load_text, str(wrong_column))
    assert "'text'" in message and "body" in message
    not_json = tmp_path / "broken.jsonl"
    not_json.write_text('{"text": "a"}\n{"text": \n')
    assert "broken.jsonl" in user_error(load_text, str(not_json))


def test_recipes_parse():
    assert {"wikitext2", "c4", "pileval"} <= set(recipe_names())
    assert load_recipe("wikitext2").path == "wikitext" and load_recipe("wikitext2").split == "train"
    assert load_recipe("c4").data_files == {"train": "en/c4-train.00000-of-01024.json.gz"}
    assert load_recipe("pileval").split == "validation"
    assert all(load_recipe(name).max_rows for name in ("c4", "pileval"))


def test_hub_recipe_offline_fails_fast_with_one_line():
    import datasets

    if calibration._hub_reachable(datasets.config.HF_ENDPOINT):
        pytest.skip("the Hugging Face Hub is reachable from here: the offline failure cannot be observed")
    start = time.perf_counter()
    message = user_error(load_text, "wikitext2", split="test")
    assert time.perf_counter() - start < 30
    assert "wikitext2" in message and "could not be downloaded" in message and "--calib self" in message


def test_hub_recipe_in_offline_mode_without_cache(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE skips the reachability probe: `load_dataset`'s own failure must become the same error."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    start = time.perf_counter()
    message = user_error(load_samples, "c4", None, n_samples=2, seqlen=8)
    assert time.perf_counter() - start < 30
    assert "'c4'" in message and "allenai/c4" in message and "--calib self" in message


def test_self_generates_deterministic_in_vocab_samples(tokenizer, model):
    samples = load_samples("self", tokenizer, n_samples=3, seqlen=24, seed=7, model=model)
    assert samples.shape == (3, 24) and samples.dtype == torch.long
    assert (samples[:, 0] == tokenizer.bos_token_id).all()
    assert samples.min() >= 0 and samples.max() < len(tokenizer)
    assert torch.equal(samples, load_samples("self", tokenizer, n_samples=3, seqlen=24, seed=7, model=model))
    assert not torch.equal(samples, load_samples("self", tokenizer, n_samples=3, seqlen=24, seed=8, model=model))


def test_self_samples_match_uncached_sampling(tokenizer, model, monkeypatch):
    """The KV-cached batched loop draws what a plain full-prefix loop draws with the same generator,
    across batch boundaries."""
    monkeypatch.setattr(calibration, "SELF_TOKENS_PER_BATCH", 2 * 12)  # batches of 2 sequences
    samples = load_samples("self", tokenizer, n_samples=3, seqlen=12, seed=11, model=model)
    generator = torch.Generator().manual_seed(11)
    reference = torch.full((3, 1), tokenizer.bos_token_id)
    with torch.no_grad():
        for lo in (0, 2):
            seq = reference[lo:lo + 2]
            for _ in range(11):
                probs = model(input_ids=seq).logits[:, -1].float().softmax(-1)
                seq = torch.cat([seq, torch.multinomial(probs, 1, generator=generator)], 1)
            assert torch.equal(samples[lo:lo + 2], seq)


def test_self_without_bos_starts_from_ordinary_tokens(tiny_model_dir, model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.bos_token = None
    bos = model.config.bos_token_id
    model.config.bos_token_id = None
    try:
        samples = load_samples("self", tokenizer, n_samples=6, seqlen=4, seed=0, model=model)
    finally:
        model.config.bos_token_id = bos
    assert samples.shape == (6, 4)
    assert not set(samples[:, 0].tolist()) & set(tokenizer.all_special_ids)
    assert len(set(samples[:, 0].tolist())) > 1


def test_self_needs_a_model(tokenizer):
    assert "model" in user_error(load_samples, "self", tokenizer, n_samples=2, seqlen=8)


def test_measurement_calibration_file(tokenizer):
    if not WIKITEXT_VALID.exists():
        pytest.skip(f"{WIKITEXT_VALID} (the protocol's calibration text) is not on this machine")
    samples = load_samples(str(WIKITEXT_VALID), tokenizer, n_samples=128, seqlen=512, seed=0)
    assert samples.shape == (128, 512)
    text = WIKITEXT_VALID.read_text(encoding="utf-8")
    assert len(calibration._line_chunks(text, calibration.TOKENIZE_CHUNK_CHARS)) > 1
    ids = tokenize(text, tokenizer)
    assert torch.equal(ids, torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]))
    assert is_window_of(samples[:8], ids).all()


def test_default_calibration_falls_back_to_self_when_the_hub_is_unreachable(tiny_model_dir, tmp_path, monkeypatch,
                                                                            capsys):
    """No --calib: the default recipe needs the Hub; without it the run calibrates on text the model writes,
    says so in one notice, and records the source it used."""
    import datasets

    from llmquant.cli import main

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--bits", "4", "--group-size", "32", "--n-samples", "4",
                 "--seqlen", "32", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert sum("--calib self" in line for line in err.splitlines()) == 1, err
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["meta"]["method"] == "gptq" and q["meta"]["calibration"].startswith("self, 4 x 32 tokens")
    assert q["desc_act"] is False and q["static_groups"] is True and q["sym"] is True
