"""The library entry points: `quantize` a float checkpoint into a packed one, `load` it back."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import QuantConfig, QuantReport, check_device
from .formats.hf import load_quantized, read_quantization_config
from .models.loader import load_float_model, resolve_model
from .nn.qlinear import QuantLinear
from .pipeline import quantize

__all__ = ["QuantConfig", "QuantReport", "check_device", "load", "load_any", "quantize"]


def is_quantized(path: Path) -> bool:
    import json

    try:
        return "quantization_config" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load(path: str | Path, device: str = "cpu"):
    """A packed checkpoint as a transformers model with QuantLinear modules."""
    path = resolve_model(path)
    read_quantization_config(path)
    return load_quantized(path, device)


def load_any(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) for a packed or float checkpoint or a GGUF file, ready for inference on `device`.

    On the CPU the float parameters are computed in float32 (bfloat16 matmuls there are slow and
    round more) and quantized layers keep their dequantized weight. Packed tensors keep their types.
    """
    from transformers import AutoTokenizer

    from .formats.gguf.reader import is_gguf, load_gguf

    if is_gguf(path):  # weights decoded to float by our block decoders
        model, tokenizer = load_gguf(path)
        return model.to(device), tokenizer
    local = resolve_model(path)
    if is_quantized(local):
        model, tokenizer = load_quantized(local, device), AutoTokenizer.from_pretrained(local)
    else:
        model, tokenizer, _, _ = load_float_model(local)
        model = model.to(device)
    if torch.device(device).type == "cpu":
        for param in model.parameters():
            param.data = param.data.float()
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.cache_weight = True
                module.dequantize_weight(torch.float32)  # at load, not inside the first forward
    return model, tokenizer
