"""llmquant: GPTQ/AWQ/RTN quantization of Hugging Face LLMs into packed safetensors and GGUF."""

__version__ = "0.1.0"

from .api import QuantConfig, load, quantize  # noqa: E402

__all__ = ["QuantConfig", "load", "quantize", "__version__"]
