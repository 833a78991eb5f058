"""llmquant: GPTQ/AWQ/RTN quantization of Hugging Face LLMs into packed safetensors and GGUF."""

from .api import QuantConfig, load, quantize
from .version import __version__

__all__ = ["QuantConfig", "load", "quantize", "__version__"]
