"""Triton dequant-matmul kernels for packed quantized weights (importable as llmquant.kernels).

`available()` can be asked without triton installed; the kernels themselves load on first use.
"""

from __future__ import annotations

import importlib

import torch

__all__ = ["available", "gptq_matmul", "groups_are_contiguous"]


def available() -> bool:
    """Whether gptq_matmul can run here: triton imports, and there is a CUDA GPU or TRITON_INTERPRET=1
    was set when the kernels were first imported."""
    try:
        gptq = importlib.import_module(".gptq", __name__)
    except ImportError:
        return False
    return gptq.INTERPRETED or torch.cuda.is_available()


def __getattr__(name: str):
    if name in ("gptq_matmul", "groups_are_contiguous"):
        value = getattr(importlib.import_module(".gptq", __name__), name)
        globals()[name] = value  # later lookups skip this hook: it sits on every QuantLinear call
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
