"""The library entry points: `quantize` a float checkpoint into a packed one, `load` it back."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .config import QuantConfig, QuantReport, check_device
from .formats.hf import load_quantized, read_quantization_config
from .models.loader import load_float_model, resolve_model
from .memory import give_back_free_memory, weights_from_the_system
from .nn.cpu import COMPUTE, use_cpu_kernels
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


def load_any(path: str | Path, device: str = "cpu", exact: bool = False):
    """(model, tokenizer) for a packed or float checkpoint or a GGUF file, ready for inference on `device`.

    On the CPU, packed layers run on PyTorch's weight-only kernels (nn/cpu.py): the weights stay
    packed and everything else keeps the checkpoint's dtype (bfloat16 for a GGUF file, whose linears
    and embedding table stay in their blocks), so the model holds about its file's bytes. exact=True
    is for quality measurements instead: every float parameter in float32 and each packed layer
    dequantized to the grid's exact weights on every call (no bfloat16 rounding, and still no float
    copy of a packed weight kept between calls); a GGUF file decoded to float32 whole.
    """
    from transformers import AutoTokenizer

    from .formats.gguf.reader import is_gguf, load_gguf

    weights_from_the_system()  # tensors freed while loading and converting go back to the system
    if is_gguf(path):
        if exact or torch.device(device).type != "cpu":  # weights decoded to float by our block decoders
            model, tokenizer = load_gguf(path)
            return model.to(device), tokenizer
        model, tokenizer = load_gguf(path, COMPUTE, packed=True)
        give_back_free_memory()
        return model, tokenizer
    local = resolve_model(path)
    if is_quantized(local):
        model, tokenizer = load_quantized(local, device), AutoTokenizer.from_pretrained(local)
    else:
        model, tokenizer, _, _ = load_float_model(local)
        model = model.to(device)
    if torch.device(device).type != "cpu":
        return model, tokenizer
    if exact:
        for param in model.parameters():
            param.data = param.data.float()
        return model, tokenizer
    kept = use_cpu_kernels(model)
    give_back_free_memory()
    if kept:
        print(f"llmquant: {len(kept)} packed linears have shapes PyTorch's CPU kernels do not take "
              f"(e.g. {kept[0]}); they dequantize on every call, which is slower", file=sys.stderr)
    return model, tokenizer
