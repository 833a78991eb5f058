"""How well --target-bpw's predicted cost ranks the true one: for a spread of linears and settings, the cost the
sensitivity pass predicts against the KL divergence measured with only that linear rounded (RTN, the same fit
the pricing uses), on the protocol's evaluation windows; prints both and their Spearman rank correlation.

    python scripts/allocation_proxy.py --model demo --calib ../shared/data/wikitext2/valid.tokens.txt \
        --data ../shared/data/wikitext2/test.raw.txt --format gptq
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(x).argsort().argsort().float() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--calib", required=True)
    p.add_argument("--data", required=True, help="evaluation text (the protocol's test.raw.txt)")
    p.add_argument("--format", default="gptq", choices=["gptq", "gguf"])
    p.add_argument("--layers", default="0,7,15,22,29", help="blocks whose linears are tried")
    p.add_argument("--windows", type=int, default=2, help="evaluation windows of 1024 tokens per measurement")
    p.add_argument("--settings", help="comma-separated settings to try, as the plan prints them (e.g. 'W3 g128,Q4_K'); "
                                      "default: every candidate")
    args = p.parse_args()

    from llmquant.config import QuantConfig
    from llmquant.eval import token_windows
    from llmquant.formats.registry import format_for
    from llmquant.models.checkpoint import Checkpoint
    from llmquant.models.loader import load_float_model
    from llmquant.pipeline import calibration_samples
    from llmquant.allocation import price
    from llmquant.sensitivity import measure

    config = QuantConfig(format=args.format, calib=args.calib, target_bpw=4.0)
    fmt, checkpoint = format_for(args.format), Checkpoint(args.model)
    layers = [int(i) for i in args.layers.split(",")]
    names = {checkpoint.adapter.block_prefix(i) + n for i in layers for n in checkpoint.adapter.linears()}
    samples, _ = calibration_samples(config, checkpoint, checkpoint.tokenizer())
    priced = measure(checkpoint, samples, names,
                     lambda n, W, H, F: (price(fmt, config, W, H, F), torch.diagonal(H).clone()))
    model, tokenizer = load_float_model(checkpoint.path)[:2]
    model = model.float().eval()
    windows = token_windows(tokenizer, open(args.data).read(), 1024, args.windows)
    with torch.inference_mode():
        base = [torch.log_softmax(model(w[None]).logits[0].float(), -1) for w in windows]
    rows = []
    for name in sorted(names):
        linear = model.get_submodule(name)
        weight = linear.weight.detach().clone()
        choices, importance = priced[name]
        keep = args.settings.split(",") if args.settings else None
        for choice in [c for c in choices if keep is None or fmt.describe(c.setting) in keep]:
            # rounded exactly as the pricing rounded it
            rounded = fmt.rounded(config, weight.float(), choice.setting, importance)
            linear.weight.data = rounded.to(weight.dtype)
            with torch.inference_mode():
                kld = sum(float((b.exp() * (b - torch.log_softmax(model(w[None]).logits[0].float(), -1))).sum(-1).mean())
                          for b, w in zip(base, windows)) / len(windows)
            linear.weight.data = weight
            rows.append({"linear": name, "setting": fmt.describe(choice.setting), "predicted": choice.cost,
                         "kld": kld})
            print(json.dumps(rows[-1]), file=sys.stderr)
    rho = spearman([r["predicted"] for r in rows], [r["kld"] for r in rows])
    ratio = sorted(r["kld"] / r["predicted"] for r in rows if r["predicted"] > 0)
    print(json.dumps({"pairs": len(rows), "spearman": rho, "median_true_over_predicted": ratio[len(ratio) // 2]}))


if __name__ == "__main__":
    main()
