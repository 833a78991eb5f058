"""Check that a gptq checkpoint written by llmquant reads the same in loaders we did not write.

usage: python scripts/interop_gptq.py QUANT_DIR [--text FILE] [--tokens N] [--peer gptqmodel|transformers|both]

Two checks per peer, both against `llmquant.load(QUANT_DIR)`:
  weights  every packed linear dequantized by the peer's own unpacking (after its v1 -> v2 zero-point
           conversion) must equal ours rounded to the peer's dtype, bit for bit (float16);
  logits   the peer's logits on the first N tokens of a text, against ours in float32 (the exact
           dequantized weights) and ours in the peer's dtype (the same fp16 arithmetic, our kernel);
           the peer's relative L2 distance from float32 must stay within twice our fp16 forward's.
Peers: GPTQModel.load(..., backend=torch), its reference torch QuantLinear; and transformers'
from_pretrained (GptqHfQuantizer through optimum and GPTQModel), which picks its own CPU kernel: for
4 bits aten's int4pack matmul (TorchAtenLinear / TorchFusedLinear), which only runs when every in-width
is a multiple of a group of 32-256 (--transformers-backend torch forces TorchLinear instead).
A peer that refuses the folder or crashes on it is reported as a failure. Exit status 1 if any check fails.

The peer lives in its own venv (GPTQModel 7.7 asks for torch>=2.14.1; 7.6's dependencies with torch
2.13 CPU run it fine):
    python3 -m venv /tmp/venv-gptqmodel && P=/tmp/venv-gptqmodel/bin/pip
    $P install torch==2.13.0 && echo torch==2.13.0 > /tmp/torch.txt   # keep the CPU torch
    $P install -c /tmp/torch.txt gptqmodel==7.6.0 optimum              # dependencies (sdist, no CUDA build)
    $P install -c /tmp/torch.txt --no-deps gptqmodel==7.7.0 && $P install -c /tmp/torch.txt "numpy>=2.4.6"
    $P install --no-deps -e . && $P install -c /tmp/torch.txt gguf
    GPTQMODEL_CPU_WORKERS=2 /tmp/venv-gptqmodel/bin/python scripts/interop_gptq.py QUANT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

DEFAULT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2" / "test.raw.txt"
PEER_DTYPE = torch.float16


def token_ids(quant_dir: Path, text_file: Path, n: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(quant_dir)
    text = text_file.read_text(encoding="utf-8")
    ids = tokenizer(text[: 32 * n], add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        sys.exit(f"{text_file} has only {len(ids)} tokens, fewer than --tokens {n}")
    return torch.tensor(ids[:n])[None]


def load_peer(kind: str, quant_dir: Path, transformers_backend: str = "auto") -> torch.nn.Module:
    if kind == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        return GPTQModel.load(str(quant_dir), device="cpu", backend=BACKEND.TORCH, dtype=PEER_DTYPE).model.eval()
    from transformers import AutoModelForCausalLM, GPTQConfig

    extra = {}
    if transformers_backend != "auto":  # a loading attribute: merged into the checkpoint's own config
        bits = json.loads((quant_dir / "config.json").read_text())["quantization_config"]["bits"]
        extra["quantization_config"] = GPTQConfig(bits=bits, backend=transformers_backend)
    return AutoModelForCausalLM.from_pretrained(quant_dir, device_map="cpu", dtype=PEER_DTYPE, **extra).eval()


def packed_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "qweight") and hasattr(m, "g_idx")}


def gptq_weight(module: torch.nn.Module) -> torch.Tensor:
    # the class's own method, not the torch.compile wrapper optimize() put on the instance
    return type(module).dequantize_weight(module)


def compare_weights(ours: dict[str, torch.nn.Module], peer: dict[str, torch.nn.Module],
                    peer_weight=gptq_weight) -> dict:
    """The peer's dequantized weights ([in, out], by `peer_weight`) against ours rounded to the peer's dtype."""
    if set(ours) != set(peer):
        missing, extra = sorted(set(ours) - set(peer)), sorted(set(peer) - set(ours))
        return {"ok": False, "error": f"packed linears differ: only ours {missing[:3]}, only the peer's {extra[:3]}"}
    worst, mismatched, total, first_bad = 0.0, 0, 0, None
    for name in sorted(ours):
        theirs = peer_weight(peer[name]).T.float()
        expected = ours[name].dequantize_weight(torch.float32).to(theirs.device).to(PEER_DTYPE).float()
        if theirs.shape != expected.shape:
            return {"ok": False, "error": f"{name}: peer weight {tuple(theirs.shape)} vs ours {tuple(expected.shape)}"}
        diff = (theirs - expected).abs()
        bad = int((diff > 0).sum())
        if bad and first_bad is None:
            first_bad = name
        mismatched += bad
        total += diff.numel()
        worst = max(worst, float(diff.max()))
    return {"ok": mismatched == 0, "linears": len(ours), "elements": total, "mismatched": mismatched,
            "max_abs": worst, "first_mismatch": first_bad}


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits[0].float()


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict:
    diff = (a - b).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "rel_l2": float((a - b).norm() / b.norm()),
            "top1": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def judge(entry: dict, floor: dict, start: float, also: bool = True) -> bool:
    """Pass when the weights match bit for bit and the peer's logits stray from our float32 ones (relative
    L2) no more than twice as far as our own fp16 forward does: with exact weights, that only bounds the
    arithmetic. `also`: a further condition of the caller's."""
    entry["tolerance_rel_l2"] = bound = 2 * floor["rel_l2"] + 1e-4
    entry["logits_ok"] = entry["vs_ours_fp32"]["rel_l2"] <= bound and also
    entry["seconds"] = round(time.perf_counter() - start, 1)
    entry["ok"] = entry["weights"]["ok"] and entry["logits_ok"]
    return entry["ok"]


def print_peer(kind: str, e: dict) -> None:
    """A peer's status and weight comparison, as both interop scripts print them."""
    status = f"FAIL {e['error']}" if "error" in e else f"{e['seconds']} s: {'ok' if e['ok'] else 'FAIL'}"
    print(f"  {kind} [{', '.join(e.get('kernel', []))}] {status}")
    w = e.get("weights")
    if w and "error" in w:
        print(f"    weights: {w['error']}")
    elif w:
        print(f"    weights: {w['linears']} linears, {w['mismatched']}/{w['elements']} elements differ "
              f"(max {w['max_abs']:.3g}{', first ' + w['first_mismatch'] if w['first_mismatch'] else ''})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("quant_dir", type=Path)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text whose first tokens are fed")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--peer", choices=("gptqmodel", "transformers", "both"), default="both")
    parser.add_argument("--transformers-backend", default="auto",
                        help="GPTQConfig(backend=...) for the transformers peer, e.g. torch (default: auto, "
                             "the kernel a user gets)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the report to FILE as JSON (the peers log to stdout)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))

    import llmquant

    ids = token_ids(args.quant_dir, args.text, args.tokens)
    ours = llmquant.load(args.quant_dir)
    reference = logits(ours.float(), ids)  # exact dequantized weights, float32 arithmetic
    our_linears = packed_linears(ours)
    ours_half = logits(ours.to(PEER_DTYPE), ids)
    floor = compare_logits(ours_half, reference)
    report = {"quant_dir": str(args.quant_dir), "tokens": args.tokens,
              "transformers_backend": args.transformers_backend,
              "quantization_config": ours.config.quantization_config,
              "ours_fp16_vs_ours_fp32": floor, "peers": {}}

    ok = True
    for kind in ("gptqmodel", "transformers") if args.peer == "both" else (args.peer,):
        entry = report["peers"][kind] = {"ok": False}
        stage, start = "load", time.perf_counter()
        try:  # a peer refusing or crashing on our folder is the finding this script exists for
            peer = load_peer(kind, args.quant_dir, args.transformers_backend)
            linears = packed_linears(peer)
            entry["kernel"] = sorted({type(m).__name__ for m in linears.values()})
            stage = "dequantize"
            entry["weights"] = compare_weights(our_linears, linears)  # before a forward repacks the buffers
            stage = "forward"
            theirs = logits(peer, ids)
        except Exception as err:
            entry["error"] = f"{stage} failed: {type(err).__name__}: {err}"
            ok = False
            continue
        entry["vs_ours_fp32"] = compare_logits(theirs, reference)
        entry["vs_ours_fp16"] = compare_logits(theirs, ours_half)
        # max-abs and top-1 are reported, not tested: a single logit or a near-tie of a 2-3 bit model can
        # move a lot under any fp16 summation order
        ok &= judge(entry, floor, start)
        del peer
    report["ok"] = ok

    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    q = report["quantization_config"]
    print(f"{args.quant_dir}: bits {q['bits']}, group {q['group_size']}, sym {q.get('sym')}, "
          f"{args.tokens} tokens")
    print(f"  ours fp16 vs ours fp32: max {floor['max_abs']:.4g}  mean {floor['mean_abs']:.3g}  "
          f"rel {floor['rel_l2']:.3g}  top1 {floor['top1']:.4f}")
    for kind, e in report["peers"].items():
        print_peer(kind, e)
        if "error" in e:
            continue
        a, b = e["vs_ours_fp32"], e["vs_ours_fp16"]
        print(f"    logits vs ours fp32: max {a['max_abs']:.4g}  mean {a['mean_abs']:.3g}  "
              f"rel {a['rel_l2']:.3g} (bound {e['tolerance_rel_l2']:.3g})  top1 {a['top1']:.4f}")
        print(f"    logits vs ours fp16: max {b['max_abs']:.4g}  mean {b['mean_abs']:.3g}  "
              f"rel {b['rel_l2']:.3g}  top1 {b['top1']:.4f}")
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
