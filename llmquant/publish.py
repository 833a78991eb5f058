"""Publishing a quantized checkpoint to the Hugging Face Hub: its model card, and one commit of its files.

The card (README.md) is written into every packed folder when it is made, and again by `push` and by
`eval --card`: metadata the Hub reads (base model, relation, license, tags), then the method and its settings,
the size, where it runs (serving.py), the quality, task accuracy and speed measured so far (kept beside the
checkpoint in its evaluation record), how to load it and the command that reproduces it. `push` validates
what it uploads the way `llmquant inspect` and the loaders do, creates the repo if needed, and uploads
everything in one commit through huggingface_hub; the token comes from HF_TOKEN or the saved login and is
never printed. The local checkpoint is only read.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .errors import UserError
from .version import __version__

DEMO_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what `demo` is built from
DEMO_LICENSE = "apache-2.0"  # its card's license (the demo is built from a GGUF file, which carries no card)
EVAL_RECORD = "llmquant_eval.json"  # a folder's measurements; a GGUF file's sit beside it as FILE.llmquant_eval.json


def record_path(path: Path) -> Path:
    path = Path(path)
    return path / EVAL_RECORD if path.is_dir() else path.with_name(f"{path.name}.{EVAL_RECORD}")


def read_record(path: Path) -> dict:
    """What has been measured of a checkpoint (quality, tasks, speed); {} when nothing has, or the record is
    unreadable (it is ours, but a card must not fail for a damaged one)."""
    try:
        record = json.loads(record_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def record_results(path: Path, **results) -> None:
    """Merge measurements (quality=..., tasks=..., speed=...) into the checkpoint's record and refresh a folder's
    card."""
    path = Path(path)
    record = {**read_record(path), **{k: v for k, v in results.items() if v is not None}}
    _replace_text(record_path(path), json.dumps(record, indent=2))
    if path.is_dir():
        write_card(path)


def record_eval(path: Path, result: dict, data: str | None, seqlen: int, windows: int, base: str | None) -> None:
    """Record what `llmquant eval` (or `quantize --eval`) measured of `path`: its quality on `data` (named as a
    reader of the card knows it: the base by its Hub id where known, a text file by its name), tasks, speed."""
    quality = None
    if "ppl" in result:
        quality = {k: v for k, v in result.items() if k not in ("tasks", "speed")}
        quality.update(data=Path(data).name if Path(data).is_file() else data, seqlen=seqlen, windows=windows,
                       base=(base_model_id(str(base)) or str(base)) if base else None)
    record_results(path, quality=quality, tasks=result.get("tasks"), speed=result.get("speed"))


def _replace_text(target: Path, text: str) -> None:
    """Write `target` whole or not at all (formats/atomic.py): a card or record is never left half-written."""
    from .formats.atomic import atomic_file

    with atomic_file(target, force=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _base_card(source: str | None):
    """The base model's own card, when its checkpoint is a local folder with one."""
    from huggingface_hub import ModelCard

    if source and (Path(source) / "README.md").is_file():
        try:
            return ModelCard.load(Path(source) / "README.md")
        except Exception:  # an unreadable card says nothing about the license; the user is asked for it
            return None
    return None


def base_model_id(source: str | None) -> str | None:
    """The Hub id of the base model: `demo`'s origin, a Hub id given as MODEL, or the id a snapshot in the
    Hub's cache was downloaded as (.../models--org--name/snapshots/REV); None for any other local folder."""
    if not source:
        return None
    if source == "demo":
        return DEMO_BASE
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not Path(source).exists():
        return source
    cached = re.search(r"models--([\w.-]+?)--([\w.-]+)/snapshots/", str(source))
    return f"{cached.group(1)}/{cached.group(2)}" if cached else None


def settings_of(path: Path) -> dict:
    """What the checkpoint says of itself: format, method, bits, group, size (a folder or a GGUF file)."""
    from .formats.gguf.reader import describe_gguf, is_gguf

    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() and not (path / "config.json").exists() else []
    if is_gguf(path) or ggufs:  # one GGUF file, or a folder of them (several mixes of one model)
        infos = [describe_gguf(f) for f in (ggufs or [path])]
        return {"format": "gguf", "method": None, "mix": ", ".join(i["mix"] for i in infos),
                "bpw": infos[0]["bpw"] if len(infos) == 1 else None, "size_bytes": sum(i["size_bytes"] for i in infos),
                "source": None, "files": [Path(i["path"]).name for i in infos], "serving": infos[0]["serving"]}
    from .formats.hf import describe, weight_files

    info = describe(path)
    meta = info.get("meta") or {}
    return {"format": info["quant_method"], "method": meta.get("method"), "bits": info["bits"],
            "group_size": info["group_size"], "sym": info["sym"], "desc_act": info["desc_act"],
            "static_groups": info["static_groups"],
            "checkpoint_format": info["checkpoint_format"], "bpw": info["bpw"],
            "size_bytes": info["size_bytes"], "source": meta.get("source"), "calibration": meta.get("calibration"),
            "command": meta.get("command"), "version": (meta.get("quantizer") or [None])[0],
            "bits_per_parameter": info["bits_per_parameter"], "files": [f.name for f in weight_files(path)],
            "serving": info["serving"], "mixed": info["mixed"], "target_bpw": meta.get("target_bpw")}


def model_card(path: Path, repo_id: str | None = None, license: str | None = None, base_model: str | None = None,
               settings: dict | None = None):
    """The huggingface_hub ModelCard of a packed folder or GGUF file (`settings`: its settings_of, if read)."""
    from huggingface_hub import ModelCard, ModelCardData

    s = settings or settings_of(path)
    base = base_model or base_model_id(s["source"])
    base_card = _base_card(s["source"])
    license = license or (getattr(base_card.data, "license", None) if base_card is not None else None) or \
        (DEMO_LICENSE if s["source"] == "demo" else None)
    gguf = s["format"] == "gguf"
    tags = ["llmquant", s["format"]] + ([s["method"]] if s["method"] else []) + \
        ([] if gguf or s.get("mixed") else [f"{s['bits']}-bit"]) + (["mixed-precision"] if s.get("mixed") else []) + \
        (s["mix"].split(", ") if gguf else [])
    tags = list(dict.fromkeys(tags))  # gptq is both a format and a method
    data = ModelCardData(base_model=base, base_model_relation="quantized" if base else None,
                         library_name="gguf" if gguf else "transformers", pipeline_tag="text-generation",
                         license=license, tags=tags, quantized_by="llmquant")
    repo = repo_id or "REPO_ID"
    body = [f"# {repo.split('/')[-1]}", "",
            f"{'A GGUF file' if gguf else 'A packed checkpoint'} of "
            f"{f'[{base}](https://huggingface.co/{base})' if base else 'its base model'}, quantized by "
            f"llmquant {__version__}.", "", "| setting | value |", "|---|---|"]
    rows = {"format": s["format"], "checkpoint format": s.get("checkpoint_format"), "method": s["method"],
            "bits": None if s.get("mixed") else s.get("bits"), "group size": None if s.get("mixed") else s.get("group_size"),
            "mixed precision": f"{s['mixed']} (target {s['target_bpw']} bits per weight)" if s.get("mixed") else None,
            "symmetric": s.get("sym"), "act-order": _act_order(s), "GGUF mix": s.get("mix"),
            "calibration": s.get("calibration"), "size": f"{s['size_bytes'] / 2**20:.1f} MiB",
            "bits per quantized weight": f"{s['bpw']:.3f}" if s["bpw"] else None,
            "bits per parameter": f"{s['bits_per_parameter']:.3f}" if s.get("bits_per_parameter") else None}
    body += [f"| {k} | {v} |" for k, v in rows.items() if v is not None]
    body += ["", "## Where it runs", "", "| runtime | loads | kernel, or why not |", "|---|---|---|"]
    body += [f"| {r['name']} | {'yes' if r['loads'] else 'no'} | {r['how']} |" for r in s["serving"]]
    record = read_record(path)
    body += _quality(record.get("quality")) + _tasks(record.get("tasks")) + _speed(record.get("speed"))
    body += ["", "## Loading it", ""] + _snippets(repo, s)
    if s.get("command"):
        body += ["", "## Reproducing it", "", "```bash", s["command"], "```", "",
                 f"({s['version'] or 'llmquant'}; OUT is the output folder.)"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def _act_order(s: dict) -> str | None:
    if s["format"] != "gptq":
        return None
    if s.get("desc_act"):
        return "yes, groups permuted (desc_act: true)"
    return "yes, static groups (g_idx stays i // group size; desc_act: false)" if s.get("static_groups") else "no"


def _quality(q: dict | None) -> list[str]:
    if not q:
        return []
    lines = ["", "## Quality", "", f"`llmquant eval` on {q['data']} ({q['windows']} windows of {q['seqlen']} tokens, "
             f"{q['tokens']:,} tokens scored)" + (f" against {q['base']}" if q.get("base") else "") + ":", ""]
    if q.get("kld") is None:
        return lines + [f"perplexity {q['ppl']:.4f}"]
    return lines + ["| measure | base | this model |", "|---|---|---|",
                    f"| perplexity | {q['base_ppl']:.4f} | {q['ppl']:.4f} |",
                    f"| KL divergence from the base (nats per token) | 0 | {q['kld']:.5f} |",
                    f"| top-1 agreement with the base | 1 | {q['top1']:.4f} |"]


def _tasks(t: dict | None) -> list[str]:
    if not t:
        return []
    lines = ["", "## Task accuracy", "", f"lm-evaluation-harness {t.get('lm_eval_version', '')}, "
             f"{t.get('num_fewshot') or 0}-shot" + (f", first {t['limit']} documents" if t.get("limit") else "") + ":",
             "", "| task | metric | base | this model | retention |", "|---|---|---|---|---|"]
    for name, r in t["results"].items():
        base = f"{r['base']:.4f}" if r.get("base") is not None else "-"
        kept = f"{r['retention']:.3f}" if r.get("retention") is not None else "-"
        lines.append(f"| {name} | {r['metric']} | {base} | {r['value']:.4f} ± {r['stderr']:.4f} | {kept} |")
    return lines


def _speed(sp: dict | None) -> list[str]:
    if not sp:
        return []
    m = sp["model"]
    lines = ["", "## Speed", "", f"`llmquant bench` on {sp.get('device', 'cpu')}: a {m['prompt_tokens']}-token prompt, "
             f"{m['new_tokens']} new tokens, greedy, each model in its own process.", "",
             "| model | dtype | prefill tokens/s | decode tokens/s | resident MiB |", "|---|---|---|---|---|"]
    for r in [m, *sp.get("base", [])]:
        lines.append(f"| {'this model' if r is m else 'base'} | {r['dtype']} | {r['prefill_tokens_per_s']:.1f} | "
                     f"{r['decode_tokens_per_s']:.2f} | {r['rss_loaded_bytes'] / 2**20:.0f} |")
    return lines


def _snippets(repo: str, s: dict) -> list[str]:
    """How to load it, exactly for this format and these settings (serving.py says which runtimes take it)."""
    if s["format"] == "gguf":
        name, mix = s["files"][0], s["mix"].split(", ")[0]
        return ["llama.cpp:", "", "```bash", f"llama-cli -hf {repo} --hf-file {name} -p \"Hello\"", "```", "",
                "Ollama:", "", "```bash", f"ollama run hf.co/{repo}:{mix}", "```"]
    serving = {r["name"]: r for r in s["serving"]}
    if s.get("mixed"):  # per-layer settings: transformers ignores them, GPTQModel reads them
        return ["GPTQModel (reads the per-layer settings in `dynamic`; transformers does not, and refuses the "
                "checkpoint):", "", "```python", "from gptqmodel import GPTQModel", "",
                f"model = GPTQModel.load(\"{repo}\")", "```", "", "llmquant:", "", "```python", "import llmquant", "",
                f"model, tokenizer = llmquant.load_any(\"{repo}\")", "```"]
    torch_backend = s["format"] == "gptq" and 'backend="torch"' in next(
        r["how"] for n, r in serving.items() if n.startswith("transformers"))
    torch_kernel = f", quantization_config=GPTQConfig(bits={s['bits']}, backend=\"torch\")" if torch_backend else ""
    lines = ["transformers (its GPTQ/AWQ support needs `gptqmodel` and `optimum` installed"
             + ("; the default int4 CPU kernel refuses these widths, so the torch kernel is named" if torch_backend
                else "") + "):", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer" + (", GPTQConfig" if torch_backend else ""),
             "", f"model = AutoModelForCausalLM.from_pretrained(\"{repo}\", device_map=\"auto\"{torch_kernel})",
             f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")", "```"]
    vllm = next((r for n, r in serving.items() if n.startswith("vLLM")), None)
    if vllm is not None and vllm["loads"]:
        lines += ["", f"vLLM, on {vllm['how']}:", "", "```bash", f"vllm serve {repo}", "```"]
    return lines + ["", "llmquant:", "", "```python", "import llmquant", "",
                    f"model, tokenizer = llmquant.load_any(\"{repo}\")", "```"]


def write_card(directory: Path) -> None:
    """README.md of a packed folder: written when it is made, and again when measurements are recorded."""
    _replace_text(Path(directory) / "README.md", str(model_card(Path(directory))))


def check_destination(repo_id: str, token: bool = True) -> None:
    """Before any long work: the repo id is well formed and (with `token`) a token is there to push with."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("it needs a namespace")
    except HFValidationError as err:
        raise UserError(f"'{repo_id}' is not a Hub repo id like user/name ({str(err).splitlines()[0]})") from None
    if token and not get_token():
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")


def _files(path: Path) -> list[tuple[str, Path]]:
    """(path in repo, local file) of everything to upload; a folder's hidden files stay behind."""
    if path.is_file():
        return [(path.name, path)]
    return sorted((str(f.relative_to(path)), f) for f in path.rglob("*")
                  if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))


def push(path: str | Path, repo_id: str, private: bool = False, revision: str | None = None, dry_run: bool = False,
         license: str | None = None, base_model: str | None = None, out=None) -> str | None:
    """Upload a packed folder or a GGUF file to `repo_id` in one commit, with a fresh model card. Returns the
    commit URL (None for a dry run, which prints what would be uploaded and the card)."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    out = out or (lambda line: print(line, file=sys.stdout))
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such checkpoint: {path}")
    check_destination(repo_id, token=not dry_run)
    settings = settings_of(path)  # validates the checkpoint as inspect does
    card = model_card(path, repo_id, license, base_model, settings)
    if not card.data.license:
        raise UserError(f"the license of {path} cannot be determined from its base model's card: pass --license "
                        f"(e.g. apache-2.0)")
    files = [(name, f) for name, f in _files(path) if name != "README.md"]
    message = (f"llmquant {__version__}: {settings.get('method') or settings.get('mix')}"
               + (f" W{settings['bits']} g{settings['group_size']}" if settings.get("bits") else "")
               + f", {settings['format']} format")
    if dry_run:
        for name, f in files:
            out(f"would upload {name} ({f.stat().st_size:,} bytes)")
        out(f"would upload README.md (the card below)\ncommit message: {message}\n\n{card}")
        return None
    token = get_token()
    api = HfApi(token=token)
    operations = [CommitOperationAdd(name, str(f)) for name, f in files]
    operations.append(CommitOperationAdd("README.md", str(card).encode()))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    except Exception as err:  # network, server, permissions: nothing local changed, the whole push can be redone
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"uploading to {repo_id} failed ({type(err).__name__}: {_without(reason, token)}); {path} is "
                        f"untouched, and `llmquant push {path} {repo_id}` uploads it again in one commit") from None
    out(f"pushed {len(operations)} files to {info.commit_url}")
    return info.commit_url


def _without(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text
