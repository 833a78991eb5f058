"""Calibration data: random token windows cut from a named Hub recipe, a local text file, or text the model writes.

A recipe is `calibration_data/<name>.json` (packaged as `llmquant.calibration_data`) with these keys:

    description  what the data is, for people
    path, name   `datasets.load_dataset` repository and config name (name may be null)
    split        split used for calibration; `load_text(..., split=...)` overrides it (e.g. wikitext2 "test")
    data_files   passed to `load_dataset` as is (null: the repository's own layout)
    text_field   the column holding each document's text
    join         separator placed between documents
    max_rows     null: read (and cache) the whole split; a number: stream only the first max_rows documents,
                 so a corpus of many gigabytes is never downloaded or tokenized whole

Local files: `.txt` is the text itself; `.jsonl` (one JSON object per line) and `.parquet` take the `text`
field/column, documents joined with a blank line.
"""

from __future__ import annotations

import http.client
import itertools
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

SELF = "self"
DEFAULT_RECIPE = "wikitext2"  # what a calibrated run reads when --calib is not given and the Hub answers
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
TEXT_FIELD = "text"
DOCUMENT_JOIN = "\n\n"
MAX_SAMPLES = 4096
HUB_PROBE_TIMEOUT_S = 5.0
TOKENIZE_CHUNK_CHARS = 1 << 20
SELF_TOKENS_PER_BATCH = 1 << 16  # bounds the KV cache of `self` generation: batch × seqlen tokens


@dataclass(frozen=True)
class Recipe:
    path: str
    split: str
    name: str | None = None
    data_files: str | list | dict | None = None
    text_field: str = TEXT_FIELD
    join: str = DOCUMENT_JOIN
    max_rows: int | None = None
    description: str = ""


def _recipe_files():
    """The recipe folder: the installed package, or the folder beside `llmquant/` in a source checkout."""
    try:
        return resources.files("llmquant.calibration_data")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "calibration_data"


def recipe_names() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in _recipe_files().iterdir() if p.name.endswith(".json"))


def load_recipe(name: str) -> Recipe:
    return Recipe(**json.loads((_recipe_files() / f"{name}.json").read_text(encoding="utf-8")))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _resolve_file(source: str) -> Path:
    """The local file `source` names; UserError for anything that is neither a usable file nor a recipe."""
    path = Path(source).expanduser()
    if not path.exists():
        if path.suffix or "/" in source or "\\" in source:
            raise UserError(f"calibration file not found: {source}")
        raise UserError(f"unknown calibration source {source!r}: not a file and not one of "
                        f"{', '.join([*recipe_names(), SELF])}")
    if not path.is_file() or path.suffix.lower() not in FILE_SUFFIXES:
        raise UserError(f"unsupported calibration file {source!r}: use a {'/'.join(FILE_SUFFIXES)} file, "
                        f"a recipe ({', '.join(recipe_names())}) or {SELF!r}")
    return path


def _read_table_text(path: Path) -> str:
    """Documents of a .jsonl/.parquet file (the `text` column), read by Arrow rather than row by row."""
    import pyarrow as pa
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            names = pq.read_schema(path).names
            table = pq.read_table(path, columns=[TEXT_FIELD]) if TEXT_FIELD in names else None
        else:
            table = pa_json.read_json(path)
            names = table.column_names
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"cannot read calibration file {path}: {_one_line(e)}") from None
    if table is None or TEXT_FIELD not in names:
        raise UserError(f"calibration file {path} has no {TEXT_FIELD!r} field (found: {', '.join(names) or 'none'})")
    column = table.column(TEXT_FIELD)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise UserError(f"calibration file {path}: field {TEXT_FIELD!r} holds {column.type}, not strings")
    return DOCUMENT_JOIN.join(column.drop_null().to_pylist())


def _read_file(path: Path) -> str:
    if path.suffix.lower() == ".txt":
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"calibration file {path} is not UTF-8 text (byte {e.start})") from None
    return _read_table_text(path)


class HubUnavailable(UserError):
    """A recipe's dataset could not be read from the Hub (offline, unreachable, no cached copy)."""


def _hub_reachable(endpoint: str) -> bool:
    """One quick HEAD request: `load_dataset` itself retries for tens of seconds before giving up."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return True  # an HTTP answer, even an error, means the Hub is there
    except (OSError, http.client.HTTPException):  # DNS failure, refused, timeout, TLS, broken reply
        return False
    return True


def _hub_text(recipe_name: str, recipe: Recipe, split: str) -> str:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def unavailable(reason: str) -> UserError:
        return HubUnavailable(f"calibration dataset {recipe_name!r} ({recipe.path}) could not be downloaded from "
                              f"the Hugging Face Hub ({reason}); use a local .txt/.jsonl/.parquet file or --calib self")

    config = datasets.config
    offline = getattr(config, "HF_HUB_OFFLINE", False) or getattr(config, "HF_DATASETS_OFFLINE", False)
    if not offline and not _hub_reachable(config.HF_ENDPOINT):
        raise unavailable(f"{config.HF_ENDPOINT} is unreachable")
    try:
        data = datasets.load_dataset(recipe.path, recipe.name, split=split, data_files=recipe.data_files,
                                     streaming=recipe.max_rows is not None)
        if recipe.max_rows is None:
            rows = data[recipe.text_field]
        else:
            rows = [row[recipe.text_field] for row in itertools.islice(data, recipe.max_rows)]
    except (ConnectionError, DatasetNotFoundError) as e:  # ConnectionError includes offline mode without a cache
        raise unavailable(_one_line(e)) from None
    return recipe.join.join(rows)


def load_text(source: str, split: str | None = None) -> str:
    """Text of a named recipe or of a local .txt/.jsonl/.parquet file."""
    if source in recipe_names():
        recipe = load_recipe(source)
        text = _hub_text(source, recipe, split or recipe.split)
    else:
        text = _read_file(_resolve_file(source))
    if not text.strip():
        raise UserError(f"calibration source {source!r} contains no text")
    return text


def _line_chunks(text: str, size: int) -> list[str]:
    """`text` cut after a newline roughly every `size` characters, so a fast tokenizer can encode pieces in
    parallel. Byte-level BPE tokenizers then give the whole-text ids except, at most, at a few cuts."""
    cuts, pos = [0], size
    while pos < len(text):
        newline = text.find("\n", pos)
        if newline < 0:
            break
        cuts.append(newline + 1)
        pos = newline + 1 + size
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def tokenize(text: str, tokenizer) -> torch.LongTensor:
    """All ids of `text` as one 1-D tensor, no special tokens added."""
    pieces = tokenizer(_line_chunks(text, TOKENIZE_CHUNK_CHARS), add_special_tokens=False, verbose=False)["input_ids"]
    count = sum(map(len, pieces))
    return torch.from_numpy(np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=count))


def _cut_windows(ids: torch.Tensor, source: str, n_samples: int, seqlen: int, seed: int) -> torch.LongTensor:
    if ids.numel() < seqlen:
        raise UserError(f"calibration text {source!r} has {ids.numel()} tokens; need at least {seqlen} "
                        f"(the sample length)")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=generator)
    return ids[starts[:, None] + torch.arange(seqlen)]


def _first_tokens(model, tokenizer, vocab: int, n_samples: int, generator: torch.Generator) -> torch.LongTensor:
    """BOS for every sample, or where there is none, an ordinary (non-special) token drawn uniformly."""
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = getattr(model.config, "bos_token_id", None)
    device = generator.device
    if isinstance(bos, int) and 0 <= bos < vocab:
        return torch.full((n_samples,), bos, dtype=torch.long, device=device)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[i for i in tokenizer.all_special_ids if i < vocab]] = False
    candidates = allowed.nonzero().squeeze(1).to(device)
    return candidates[torch.randint(len(candidates), (n_samples,), generator=generator, device=device)]


def _static_cache(model, length: int):
    """A KV cache allocated once for the whole sequence. transformers' default cache grows by concatenation,
    copying every layer's keys and values at each step: on the demo (128 sequences of 512 tokens) sampling took
    699 s with it and 299 s with this one. None (the default cache) where the model takes no static one."""
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=length)
    except (TypeError, ValueError, AttributeError):
        return None


@torch.inference_mode()
def _self_samples(model, tokenizer, n_samples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """Data-free calibration: sequences sampled from the model itself at temperature 1, with a KV cache."""
    from tqdm.auto import tqdm

    device = model.get_input_embeddings().weight.device
    if device.type == "meta":
        device = torch.device("cpu")
    # the embedding may be padded past the tokenizer: those ids decode to nothing, so they are never sampled
    vocab = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
    generator = torch.Generator(device=device).manual_seed(seed)
    batch = max(1, min(n_samples, SELF_TOKENS_PER_BATCH // seqlen))
    samples = torch.empty(n_samples, seqlen, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        first = _first_tokens(model, tokenizer, vocab, n_samples, generator)
        with tqdm(total=n_samples * seqlen, desc="self calibration", unit="tok") as bar:
            for lo in range(0, n_samples, batch):
                seq = torch.empty(min(batch, n_samples - lo), seqlen, dtype=torch.long, device=device)
                seq[:, 0] = first[lo:lo + batch]
                bar.update(seq.shape[0])
                cache = _static_cache(model, seqlen)
                for t in range(1, seqlen):
                    out = model(input_ids=seq[:, t - 1:t], past_key_values=cache, use_cache=True,
                                cache_position=torch.tensor([t - 1], device=device))
                    cache = out.past_key_values
                    logits = out.logits[:, -1].float()
                    logits[:, vocab:] = float("-inf")
                    seq[:, t] = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
                    bar.update(seq.shape[0])
                samples[lo:lo + batch] = seq.cpu()
    finally:
        model.train(was_training)
    return samples


def load_samples(source: str, tokenizer, n_samples: int = 128, seqlen: int = 2048, seed: int = 0,
                 model=None) -> torch.LongTensor:
    """Calibration token windows [n_samples, seqlen]: random windows of a recipe's or a file's text, or
    sequences the model samples itself (`source="self"`, needs `model`). Same inputs give the same tensor."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or not 1 <= n_samples <= MAX_SAMPLES:
        raise UserError(f"number of calibration samples must be 1..{MAX_SAMPLES}, got {n_samples}")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise UserError(f"calibration sample length must be at least 1 token, got {seqlen}")
    if source == SELF:
        if model is None:
            raise UserError(f"calibration source {SELF!r} generates text with the model, but no model was given")
        return _self_samples(model, tokenizer, n_samples, seqlen, seed)
    return _cut_windows(tokenize(load_text(source), tokenizer), source, n_samples, seqlen, seed)
