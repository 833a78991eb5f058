"""llmquant: GPTQ/AWQ/RTN quantization of Hugging Face LLMs into packed safetensors and GGUF."""

from .api import QuantConfig, load, load_any, quantize
from .version import __version__

__all__ = ["QuantConfig", "load", "load_any", "quantize", "__version__"]
