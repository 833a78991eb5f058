"""GGUF: llama.cpp's block formats as torch codecs."""

from llmquant.formats.gguf.quants import FORMATS, QK_K, BlockFormat

__all__ = ["FORMATS", "QK_K", "BlockFormat"]
