"""Triton dequant-matmul kernels for packed quantized weights, installed as llmquant.kernels (gptq.py).

Import them as `llmquant.kernels.gptq`; `llmquant.nn.qlinear` decides whether they can run.

Run from a checkout's root (`python -m pytest`, `python -m lm_eval`, `python -c`), Python finds this folder
as a top-level `kernels` before the Hub's package of that name, which transformers >= 5.25 imports on every
model load. Imported under that name, this file hands the name over to the Hub's package.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or ".") != _checkout])
    if _spec is None or _spec.loader is None:
        raise ImportError("no module named 'kernels' (this checkout's kernels/ folder is llmquant.kernels)")
    _hub = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _hub  # what `import kernels` returns once this file has run
    _spec.loader.exec_module(_hub)
