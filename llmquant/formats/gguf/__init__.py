"""GGUF files: llama.cpp's type mixes, the streaming writer, the reader and its validation."""
