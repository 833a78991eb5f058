"""Check that an awq (GEMM) checkpoint written by llmquant reads the same in loaders we did not write.

usage: python scripts/interop_awq.py QUANT_DIR [--text FILE] [--tokens N] [--prompts K]
                                     [--peer gptqmodel|transformers|spec|all] [--spec-samples N] [--json FILE]

Checks per peer, all against `llmquant.load_any(QUANT_DIR)` (float32 arithmetic on the exact dequantized
weights) and `llmquant.load(QUANT_DIR)`:
  weights  every packed linear dequantized by the peer's own AWQ unpacking (gptqmodel's dequantize_gemm on
           the module's qweight/qzeros/scales, read before a forward can repack them) must equal ours
           rounded to float16, bit for bit;
  logits   the peer's float16 logits on K prompts (K windows of N tokens of a text) against ours in float32
           and ours in float16 (the same fp16 arithmetic, our kernel). Tested: relative L2 distance from
           float32 over all positions within twice our own fp16 forward's, and at each prompt's last token
           max |logit - ours| <= 0.02 * max |our logit|. Top-1 agreement is reported, not tested.
Peers:
  gptqmodel     GPTQModel.load(..., backend=BACKEND.TORCH_AWQ): AwqTorchLinear, its reference torch kernel;
  transformers  AutoModelForCausalLM.from_pretrained(..., device_map="cpu") (AwqQuantizer, which builds its
                linears through GPTQModel): the kernel a user gets on CPU, aten's int4pack matmul
                (TorchAtenAwqLinear) on this machine;
  spec          no library: a literal reading of the published llm-awq / AutoAWQ GEMM layout
                (WQLinear_GEMM.from_linear) written here with scalar loops, on the raw safetensors. For
                every packed linear it checks the tensor shapes and dtypes, then at N sampled positions
                (all with --spec-samples -1) the 4-bit code, zero point and (code - zero) * scale against
                our QuantLinear's, exactly.
A peer that refuses the folder or crashes on it is reported as a failure. Exit status 1 if any check fails.

The peers live in the venv of scripts/interop_gptq.py (GPTQModel 7.7 with torch 2.13 CPU, transformers,
optimum, llmquant installed without dependencies); set it up as its docstring says, then:
    GPTQMODEL_CPU_WORKERS=2 /tmp/venv-gptqmodel/bin/python scripts/interop_awq.py QUANT_DIR
QUANT_DIR from e.g. `llmquant quantize demo --method rtn --format awq --group-size 64 --asym --out DIR`.
The spec peer alone needs only llmquant's own venv: `python scripts/interop_awq.py QUANT_DIR --peer spec`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from interop_gptq import (  # scripts/ is on the path when run as a script
    compare_weights,
    judge,
    print_peer,
)

DEFAULT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2" / "test.raw.txt"
FALLBACK_PROMPTS = (
    "The capital of France is Paris, and the capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village at the edge of the forest, there lived",
)
PEER_DTYPE = torch.float16
PEERS = ("gptqmodel", "transformers", "spec")


def prompts(quant_dir: Path, text_file: Path, k: int, n: int) -> list[torch.Tensor]:
    """k consecutive windows of n tokens of text_file (three fixed sentences if it does not exist)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(quant_dir)
    if not text_file.exists():
        print(f"{text_file} not found: using {len(FALLBACK_PROMPTS)} built-in prompts")
        return [torch.tensor(tokenizer(p)["input_ids"])[None] for p in FALLBACK_PROMPTS]
    text = text_file.read_text(encoding="utf-8")
    ids = tokenizer(text[: 32 * n * k], add_special_tokens=False)["input_ids"]
    if len(ids) < n * k:
        sys.exit(f"{text_file} has only {len(ids)} tokens, fewer than --prompts x --tokens = {n * k}")
    return [torch.tensor(ids[i * n:(i + 1) * n])[None] for i in range(k)]


# ----------------------------------------------------------------------------------------------------
# spec: the published AWQ GEMM layout, read literally (not llmquant's code, not a peer library's).
#
# llm-awq's WQLinear_GEMM.from_linear (and AutoAWQ's, unchanged) builds, for a linear with weight W [out, in]:
#   intweight[i, o] = round(W[o, i] / scales[i // g, o]) + zeros[i // g, o]       codes, shape [in, out]
#   order_map = [0, 2, 4, 6, 1, 3, 5, 7]; pack_num = 32 // w_bit = 8
#   qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)   for i in 0..7  -> int32 [in, out/8]
#   qzeros, packed the same way from zeros [in/g, out]                                  -> int32 [in/g, out/8]
#   scales: float16 [in/g, out]
# and the GEMM kernel computes with W[o, i] = (intweight[i, o] - zeros[i // g, o]) * scales[i // g, o].
# So output column o of a row is nibble p of word o // 8, where order_map[p] == o % 8.
AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def spec_nibble(word: int, column: int) -> int:
    """The 4-bit value of output column `column` stored in the int32 `word` of its block of 8."""
    position = AWQ_ORDER_MAP.index(column % 8)
    return (word >> (4 * position)) & 0xF  # Python ints shift arithmetically; the mask takes 4 bits


def spec_check(quant_dir: Path, ours: dict[str, torch.nn.Module], samples: int, seed: int = 0) -> dict:
    from safetensors import safe_open

    config = json.loads((quant_dir / "config.json").read_text())["quantization_config"]
    problems = []
    expected_config = {"quant_method": "awq", "version": "gemm", "bits": 4, "zero_point": True}
    for key, value in expected_config.items():
        got = config.get(key)
        if (got.lower() if isinstance(got, str) else got) != value:
            problems.append(f"config {key}={got!r}, the GEMM layout says {value!r}")
    g = config.get("group_size")
    index = quant_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else [p.name for p in quant_dir.glob("*.safetensors")])
    handles = {}
    for f in files:
        h = safe_open(str(quant_dir / f), "pt")
        handles.update({k: h for k in h.keys()})  # noqa: SIM118 (a safetensors handle, not a dict)
    packed = sorted(k[: -len(".qweight")] for k in handles if k.endswith(".qweight"))
    if set(packed) != set(ours):
        problems.append(f"packed linears differ: {len(packed)} in the files, {len(ours)} QuantLinear in ours")
    rng = random.Random(seed)
    checked = mismatched = 0
    first_bad = None
    for name in packed:
        qweight = handles[f"{name}.qweight"].get_tensor(f"{name}.qweight")
        qzeros = handles[f"{name}.qzeros"].get_tensor(f"{name}.qzeros")
        scales = handles[f"{name}.scales"].get_tensor(f"{name}.scales")
        in_f, words = qweight.shape
        out_f = scales.shape[1]
        groups = 1 if g == -1 else -(-in_f // g)
        gs = in_f if g == -1 else g
        shapes = {"qweight": (tuple(qweight.shape), qweight.dtype, (in_f, out_f // 8), torch.int32),
                  "qzeros": (tuple(qzeros.shape), qzeros.dtype, (groups, out_f // 8), torch.int32),
                  "scales": (tuple(scales.shape), scales.dtype, (groups, out_f), torch.float16)}
        bad_shapes = [f"{k} {s} {d} (expected {es} {ed})" for k, (s, d, es, ed) in shapes.items()
                      if s != es or d != ed]
        if out_f % 8 or words * 8 != out_f or bad_shapes:
            problems.append(f"{name}: {'; '.join(bad_shapes) or f'out {out_f} not 8 x {words} words'}")
            continue
        if name not in ours:
            continue
        mine = ours[name].unpack()  # llmquant's QuantizedWeight: codes/zeros [out, in|groups], scales
        mine_w = ours[name].dequantize_weight(torch.float32)  # [out, in]
        qweight, qzeros, scales = qweight.tolist(), qzeros.tolist(), scales.float().tolist()
        positions = ([(i, o) for i in range(in_f) for o in range(out_f)] if samples < 0
                     else [(rng.randrange(in_f), rng.randrange(out_f)) for _ in range(samples)])
        rows, cols = [o for _, o in positions], [i for i, _ in positions]
        codes_at = mine.codes[rows, cols].tolist()
        zeros_at = mine.zeros[rows, [i // gs for i in cols]].tolist()
        w_at = mine_w[rows, cols].tolist()
        for (i, o), code_ours, zero_ours, w_ours in zip(positions, codes_at, zeros_at, w_at):
            code = spec_nibble(qweight[i][o // 8], o)
            zero = spec_nibble(qzeros[i // gs][o // 8], o)
            scale = scales[i // gs][o]  # float16 widened to float: exact
            w = float(torch.tensor((code - zero) * scale, dtype=torch.float32))  # one rounding, as fp32
            checked += 1
            if code != code_ours or zero != zero_ours or w != w_ours:
                mismatched += 1
                if first_bad is None:
                    first_bad = (f"{name}[in {i}, out {o}]: spec code {code} zero {zero} w {w}, "
                                 f"ours code {code_ours} zero {zero_ours} w {w_ours}")
    return {"ok": not problems and mismatched == 0 and checked > 0, "linears": len(packed),
            "elements": checked, "mismatched": mismatched, "first_mismatch": first_bad,
            "problems": problems[:5]}


# ----------------------------------------------------------------------------------------------------
# library peers


def load_peer(kind: str, quant_dir: Path) -> torch.nn.Module:
    if kind == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        return GPTQModel.load(str(quant_dir), device="cpu", backend=BACKEND.TORCH_AWQ, dtype=PEER_DTYPE).model.eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(quant_dir, device_map="cpu", dtype=PEER_DTYPE).eval()


def our_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "qweight") and hasattr(m, "g_idx")}


def peer_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "qweight") and hasattr(m, "qzeros") and hasattr(m, "scales")}


def awq_weight(module: torch.nn.Module) -> torch.Tensor:
    """The peer's own AWQ dequantization of its loaded buffers, [in, out]."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(module.qweight, module.qzeros, module.scales, module.bits, module.group_size)


@torch.no_grad()
def logits(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids, use_cache=False).logits[0].float() for ids in batches]


def compare_logits(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    """a against b: over all positions of all prompts, and at each prompt's last token."""
    A, B = torch.cat(a), torch.cat(b)
    last_a, last_b = torch.stack([x[-1] for x in a]), torch.stack([x[-1] for x in b])
    last_diff = (last_a - last_b).abs().amax(-1)
    return {"max_abs": float((A - B).abs().max()), "rel_l2": float((A - B).norm() / B.norm()),
            "top1": float((A.argmax(-1) == B.argmax(-1)).float().mean()),
            "last_max_abs": [float(x) for x in last_diff],
            "last_bound": [0.02 * float(x.abs().max()) for x in last_b],
            "last_top1": [int(x) for x in (last_a.argmax(-1) == last_b.argmax(-1))]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("quant_dir", type=Path)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text whose first tokens are fed")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per prompt")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--peer", choices=(*PEERS, "all"), default="all")
    parser.add_argument("--spec-samples", type=int, default=4096,
                        help="positions checked per linear by the spec reading (-1: every element)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the report to FILE as JSON (the peers log to stdout)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    kinds = PEERS if args.peer == "all" else (args.peer,)

    import llmquant
    from llmquant.api import load_any

    ours_packed = llmquant.load(args.quant_dir)
    linears = our_linears(ours_packed)
    q = ours_packed.config.quantization_config
    report = {"quant_dir": str(args.quant_dir), "quantization_config": q, "peers": {}}
    ok = True
    if "spec" in kinds:
        start = time.perf_counter()
        entry = report["peers"]["spec"] = spec_check(args.quant_dir, linears, args.spec_samples)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        ok &= entry["ok"]

    if any(k != "spec" for k in kinds):
        batches = prompts(args.quant_dir, args.text, args.prompts, args.tokens)
        report["prompt_tokens"] = [int(b.shape[1]) for b in batches]
        reference = logits(load_any(args.quant_dir, exact=True)[0].eval(), batches)  # float32, exact weights
        ours_half = logits(ours_packed.to(PEER_DTYPE), batches)
        floor = report["ours_fp16_vs_ours_fp32"] = compare_logits(ours_half, reference)
    for kind in kinds:
        if kind == "spec":
            continue
        entry = report["peers"][kind] = {"ok": False}
        stage, start = "load", time.perf_counter()
        try:  # a peer refusing or crashing on our folder is the finding this script exists for
            peer = load_peer(kind, args.quant_dir)
            theirs_linears = peer_linears(peer)
            entry["kernel"] = sorted({type(m).__name__ for m in theirs_linears.values()})
            stage = "dequantize"
            entry["weights"] = compare_weights(linears, theirs_linears, awq_weight)  # before a forward repacks them
            stage = "forward"
            theirs = logits(peer, batches)
        except Exception as err:  # noqa: BLE001 (any crash of the peer is a finding)
            entry["error"] = f"{stage} failed: {type(err).__name__}: {err}"
            ok = False
            continue
        entry["vs_ours_fp32"] = a = compare_logits(theirs, reference)
        entry["vs_ours_fp16"] = compare_logits(theirs, ours_half)
        ok &= judge(entry, floor, start, also=all(d <= b for d, b in zip(a["last_max_abs"], a["last_bound"])))
        del peer
    report["ok"] = ok

    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    meta = q.get("meta", {})
    print(f"{args.quant_dir}: awq {q.get('version')}, bits {q['bits']}, group {q['group_size']}, zero_point "
          f"{q.get('zero_point')}, sym {meta.get('sym')}, {len(linears)} packed linears")

    def line(name: str, c: dict) -> str:
        last = ", ".join(f"{d:.3g}/{b:.3g}" for d, b in zip(c["last_max_abs"], c["last_bound"]))
        return (f"    {name}: max {c['max_abs']:.4g}  rel {c['rel_l2']:.3g}  top1 {c['top1']:.4f}  "
                f"last-token max|d|/bound [{last}]  last top1 {sum(c['last_top1'])}/{len(c['last_top1'])}")

    if "ours_fp16_vs_ours_fp32" in report:
        print(f"  prompts {report['prompt_tokens']} tokens")
        print(line("ours fp16 vs ours fp32", report["ours_fp16_vs_ours_fp32"]))
    for kind, e in report["peers"].items():
        if kind == "spec":
            print(f"  spec (literal GEMM-layout reading) {e['seconds']} s: {'ok' if e['ok'] else 'FAIL'}")
            print(f"    {e['linears']} linears, {e['mismatched']}/{e['elements']} sampled elements differ"
                  f"{' (first ' + e['first_mismatch'] + ')' if e['first_mismatch'] else ''}")
            for p in e["problems"]:
                print(f"    {p}")
            continue
        print_peer(kind, e)
        if "error" in e:
            continue
        print(line(f"logits vs ours fp32 (rel bound {e['tolerance_rel_l2']:.3g})", e["vs_ours_fp32"]))
        print(line("logits vs ours fp16", e["vs_ours_fp16"]))
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
