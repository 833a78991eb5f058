"""Resolving a MODEL argument to a local checkpoint and loading it as a float model.

Safetensors only: pickled `.bin` weights are never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from ..errors import UserError, require_finite
from .adapters import ArchAdapter, adapter_for

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def resolve_model(name: str | Path) -> Path:
    """A local model directory for `name`: 'demo', a local path, or a Hub id (downloaded when online)."""
    name = str(name)
    if name == "demo":
        from .demo import demo_model_path

        return demo_model_path()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path} is not a model directory: it has no config.json")
        return path
    if path.exists():
        raise UserError(f"{path} is a file; give a model directory (or 'demo')")
    if _looks_like_hub_id(name):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
        except Exception as err:  # offline, gated, missing: all end the same way for the user
            raise UserError(f"could not fetch '{name}' from the Hugging Face Hub "
                            f"({type(err).__name__}); give a local model directory") from None
    raise UserError(f"no such model directory: {path}")


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path / 'config.json'}: {err}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{path / 'config.json'} has no model_type")
    return config


class HeaderInfo(NamedTuple):
    file: Path  # the shard holding it: a linear's packed fields may sit in different shards
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "I32", "F16", ...


def tensor_headers(files: list[Path]) -> dict[str, HeaderInfo]:
    """Every tensor's shard, shape and dtype, from the headers alone; a malformed file is a UserError."""
    infos = {}
    for f in files:
        try:
            with safe_open(f, "pt") as handle:
                for name in handle.keys():
                    t = handle.get_slice(name)
                    infos[name] = HeaderInfo(f, tuple(t.get_shape()), t.get_dtype())
        except Exception as err:  # safetensors validates the header; anything wrong is a bad file
            raise UserError(f"{f}: not a valid safetensors file ({err})") from None
    return infos


def check_safetensors(path: Path) -> None:
    """The weights are safetensors (never unpickled) whose headers agree with their files."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        tensor_headers(files)
        return
    pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = f" (found {pickled[0]}: pickled weights are not loaded, convert them to safetensors)" if pickled else ""
    raise UserError(f"no .safetensors weights in {path}{hint}")


def load_float_model(name: str | Path, dtype: torch.dtype | None = None,
                     trust_remote_code: bool = False) -> tuple[torch.nn.Module, object, ArchAdapter, Path]:
    """(model on CPU in eval mode, tokenizer, adapter, local path) for a float checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    config = read_config(path)
    if "quantization_config" in config:
        raise UserError(f"{path} is already quantized ({config['quantization_config'].get('quant_method')}); "
                        f"give a float checkpoint")
    check_safetensors(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load {path}: {str(err).splitlines()[0]}") from None
    for name, tensor in model.state_dict().items():
        require_finite(tensor, path, name)
    return model.eval(), tokenizer, adapter_for(config["model_type"], model), path
