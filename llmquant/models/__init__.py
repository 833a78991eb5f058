from .adapters import ADAPTERS, ArchAdapter, adapter_for
from .loader import load_float_model, resolve_model

__all__ = ["ADAPTERS", "ArchAdapter", "adapter_for", "load_float_model", "resolve_model"]
