"""Triton dequant-matmul kernels for packed quantized weights, installed as llmquant.kernels (gptq.py).

Import them as `llmquant.kernels.gptq`; `llmquant.nn.qlinear` decides whether they can run. This folder
must never be imported as a top-level `kernels`: that name is the Hub's package, which transformers
imports (see llmquant/__init__.py for how a checkout's root is kept off sys.path).
"""
