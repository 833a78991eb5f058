"""llmquant: GPTQ/AWQ/RTN quantization of Hugging Face LLMs into packed safetensors and GGUF."""

import sys
from pathlib import Path


def _unshadow_hub_kernels() -> None:
    """Take this checkout's root off sys.path (`python -m ...` or `python -c` run there puts it first).

    The checkout's kernels/ folder, installed as llmquant.kernels, would there be importable as a top-level
    `kernels` and shadow the Hub's package of that name, which transformers >= 5.25 imports: every model
    load would fail. llmquant itself is imported already, so nothing here needs the root. Installed copies
    are left alone (no pyproject.toml beside them)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "kernels" / "gptq.py").is_file():
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]


_unshadow_hub_kernels()

from .api import QuantConfig, load, load_any, quantize  # noqa: E402 - after the sys.path fix above
from .version import __version__  # noqa: E402

__all__ = ["QuantConfig", "load", "load_any", "quantize", "__version__"]
