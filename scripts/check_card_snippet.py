"""Run the transformers snippet of a packed folder's model card, as a user would, and compare its logits with
llmquant's exact load of the same folder.

usage: python scripts/check_card_snippet.py QUANT_DIR

The snippet's repo id is replaced by the local folder. transformers loads gptq/awq checkpoints through optimum
and GPTQModel, which need their own venv here (see scripts/interop_gptq.py for how to make it); llmquant must be
importable there too (`pip install --no-deps -e .`). Prints the code run, the kernel class transformers chose,
the relative L2 distance of its logits from llmquant's float32 ones and the top-1 agreement; exit status 1 if
the snippet fails or top-1 agreement is below 90%.
"""

from __future__ import annotations

import re
import sys

import torch


def main() -> int:
    path = sys.argv[1]
    card = open(f"{path}/README.md", encoding="utf-8").read()
    found = re.search(r"^transformers \(.*?```python\n(.*?)```", card, re.S | re.M)
    if found is None:
        print(f"{path}/README.md has no transformers snippet")
        return 1
    code = re.sub(r'"(REPO_ID|[\w.-]+/[\w.-]+)"', repr(path), found.group(1))  # the repo id, wherever it appears
    print(code)
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card's own snippet, which is what is being checked
    model, tokenizer = scope["model"], scope["tokenizer"]
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    import llmquant

    ours, _ = llmquant.load_any(path, exact=True)
    with torch.no_grad():
        peer, ref = model(ids).logits.float(), ours(ids).logits.float()
    rel = ((peer - ref).norm() / ref.norm()).item()
    agree = (peer.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kernel = type(next(m for n, m in model.named_modules() if n.endswith("q_proj"))).__name__
    print(f"{kernel}: logits {rel:.4f} relative L2 from llmquant's float32, top-1 agreement {agree:.3f}")
    return 0 if agree >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
