"""The `llmquant` command line."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

from .errors import UserError, one_line

EPILOG = "MODEL is a local Hugging Face checkpoint directory, a Hub id (online), or 'demo' (SmolLM2-135M-Instruct)."


def _add_eval_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}data", default=None if not prefix else "wikitext2",
                   help="evaluation text: a .txt/.jsonl/.parquet file, or a dataset recipe name "
                        "(wikitext2 = its test split, needs the Hub) (default: wikitext2"
                        + ("" if prefix else "; with --tasks, no perplexity unless given") + ")")
    p.add_argument(f"--{prefix}seqlen", type=int, default=1024, help="tokens per window (default: 1024)")
    p.add_argument(f"--{prefix}windows", type=int, default=32, help="windows scored (default: 32)")


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length for the prefill (default: 256)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded, greedily (default: 32)")
    _add_compile_arg(p)


def _add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="static KV cache and a torch.compile'd decode step: faster decoding once compiled, but "
                        "compiling takes a minute or more, so it pays only for long generations")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmquant", description="Quantize LLM checkpoints and evaluate them.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a float checkpoint into a packed one", epilog=EPILOG,
                       description="Quantize MODEL layer by layer and write a packed checkpoint to --out.")
    q.add_argument("model", metavar="MODEL")
    q.add_argument("--method", default="gptq",
                   help="gptq (calibrated, the best quality for its time) | rtn (round to nearest: no calibration, "
                        "fastest; with --format gguf, llama-quantize's own rounding) | awq (activation-aware "
                        "scales and clipping, then RTN) | awq+gptq (AWQ scales, then GPTQ) | imatrix (GGUF: block "
                        "fits weighted by the mean square of each input column, as llama.cpp's imatrix) "
                        "(default: gptq)")
    q.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default: 4)")
    q.add_argument("--group-size", type=int, default=128,
                   help="input columns sharing a scale and zero; -1 = per output channel (default: 128)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True,
                     help="symmetric grid, fixed zero point (default; what Marlin-style kernels need)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid: better at 2-3 bits")
    q.add_argument("--clip", default=None,
                   help="minmax: each group's full range | mse: the shrunk range with the least (Hessian-weighted) "
                        "rounding error (default: mse for gptq and awq+gptq, minmax otherwise)")
    q.add_argument("--calib", default=None,
                   help="calibration text for calibrated methods: a .txt/.jsonl/.parquet file, a dataset recipe "
                        "(wikitext2, c4, pileval; needs the Hub), or 'self' (the model writes its own) (default: "
                        "wikitext2, or self when the Hub is unreachable)")
    q.add_argument("--n-samples", type=int, default=128, help="calibration samples, 1-4096 (default: 128)")
    q.add_argument("--seqlen", type=int, default=512,
                   help="tokens per calibration sample, capped at the model's context (default: 512)")
    q.add_argument("--seed", type=int, default=0, help="seed for sampling calibration windows (default: 0)")
    q.add_argument("--expert-min-tokens", type=int, metavar="N",
                   help="mixtures of experts: an expert the router sends fewer calibration tokens is observed on "
                        "every token instead (0: only experts no token reaches; default: as many as its linears "
                        "have inputs)")
    gq = q.add_argument_group("GPTQ")
    gq.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                    help="solve columns by decreasing Hessian diagonal; much better quality at no cost "
                         "(default: on, except for --format gguf)")
    gq.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                    help="with act-order: fit group parameters before permuting, so the checkpoint keeps "
                         "g_idx = i // group_size (fast kernels); --no-static-groups writes a permuted g_idx "
                         "(desc_act) (default: on with act-order)")
    gq.add_argument("--damp", type=float, default=0.01,
                    help="Hessian damping as a fraction of its mean diagonal; raised automatically when the "
                         "Cholesky factorization fails (default: 0.01)")
    gq.add_argument("--block-size", type=int, default=128, help="columns per lazy-batch update (default: 128)")
    gq.add_argument("--float-targets", action="store_true",
                    help="fit each linear to the float model's outputs on the float model's inputs, so the error "
                         "earlier layers left is compensated (GPTAQ's asymmetric calibration); much better at 3 "
                         "bits, but a second stream of calibration activations and up to twice the time")
    gq.add_argument("--refit-scales", action=argparse.BooleanOptionalAction, default=True,
                    help="after the column updates, refit each row's group scales by least squares on the layer "
                         "output error for the codes chosen (integer grid only) (default: on)")
    gq.add_argument("--tune-iters", type=int, default=0,
                    help="after GPTQ rounds a block, tune its rounding and group scales for this many steps of "
                         "signed gradient descent against the float block's output (SignRound); about three times "
                         "slower, lower error; 20 is a good start at 4 bits, 40 at 3 (default: 0, off)")
    gq.add_argument("--tune-samples", type=int, default=4, help="calibration samples per tuning step (default: 4)")
    aq = q.add_argument_group("AWQ")
    aq.add_argument("--no-duo-scaling", dest="duo_scaling", action="store_false",
                    help="search scales mean|x|^a alone instead of mean|x|^a / mean|w|^(1-a)")
    aq.add_argument("--awq-clip", action=argparse.BooleanOptionalAction, default=None,
                    help="after the scales, clip each group's weights to the range with the least output error "
                         "(default: on for awq; off for awq+gptq, where GPTQ searches the ranges itself)")
    aq.add_argument("--awq-search", choices=["rtn", "gptq", "block"], default=None,
                    help="judge each candidate scale by the error min-max RTN leaves in the group's linear outputs "
                         "(about half the time of block), by that of the GPTQ solve that follows, or by what RTN "
                         "of the group does to the whole block's output on 4096 calibration tokens (AWQ's module "
                         "output) (default: block for awq, gptq for awq+gptq, rtn for awq+gptq into GGUF)")
    mp = q.add_argument_group("mixed precision")
    mp.add_argument("--target-bpw", type=float, metavar="B",
                    help="give each linear the bits and group size (gptq: 2/3/4/8 bits x groups 32/64/128; gguf: "
                         "the block types llama.cpp can place on it) that minimise the model's predicted loss at B "
                         "bits per quantized weight, measured by one backward pass over 8 calibration samples; "
                         "--bits/--group-size/--gguf-type then only name the candidates' grid and the file's mix")
    mp.add_argument("--dry-run-allocation", action="store_true",
                    help="with --target-bpw: print each linear's setting, bytes and predicted cost, write nothing")
    gg = q.add_argument_group("GGUF")
    gg.add_argument("--gguf-type", default="Q4_K_M",
                    help="llama.cpp mix: Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_0, Q4_1, Q4_K_S, Q4_K_M, Q5_0, Q5_1, "
                         "Q5_K_S, Q5_K_M, Q6_K, Q8_0, F16, BF16, F32 (default: Q4_K_M); per-tensor types follow "
                         "llama-quantize's rules")
    gg.add_argument("--tensor-type", dest="tensor_types", action="append", default=[], metavar="PATTERN=TYPE",
                    help="give tensors whose GGUF name matches the regex PATTERN the block TYPE (e.g. "
                         "attn_v=Q8_0); repeatable, first match wins")
    q.add_argument("--format", default="gptq",
                   help="gptq | awq (AWQ GEMM layout, 4-bit only) | gguf (one llama.cpp file; --bits and "
                        "--group-size then only steer AWQ's search) (default: gptq)")
    q.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"], default="gptq",
                   help="--format gptq: how qzeros store each zero point. gptq (v1, AutoGPTQ's) stores zero - 1 and "
                        "cannot hold an asymmetric zero of 0; gptq_v2 stores the zero itself. transformers reads "
                        "both; GPTQModel loads asymmetric checkpoints from other tools only as gptq_v2; vLLM serves "
                        "only symmetric ones, in either (`llmquant inspect` says where a checkpoint runs) "
                        "(default: gptq)")
    q.add_argument("--out", required=True, help="output directory, or file for --format gguf (written atomically)")
    q.add_argument("--device", default="cpu", help="where blocks are quantized: cpu | cuda (default: cpu)")
    q.add_argument("--max-memory", metavar="SIZE",
                   help="host memory the run may hold, e.g. 2GB or 1500MiB: the model is read one decoder block "
                        "at a time, and calibration activations that do not fit beside it are memory-mapped "
                        "in --work-dir (or a hidden folder beside --out) (default: 80%% of the available memory)")
    q.add_argument("--allow-float", action="store_true",
                   help="go ahead even when the format cannot pack more than 10%% of the linears, which then "
                        "stay in float (by default such a run stops before any work)")
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    q.add_argument("--work-dir", help="keep a durable record of every finished block here, so an interrupted "
                                      "run can continue with --resume")
    q.add_argument("--resume", action="store_true",
                   help="continue the run recorded in --work-dir (same model, calibration and settings)")
    q.add_argument("--eval", action="store_true",
                   help="after writing, report ppl and KLD against MODEL, and the packed model's inference speed "
                        "and memory beside MODEL's (as `llmquant bench`)")
    _add_eval_args(q, "eval-")
    _add_speed_args(q)
    q.add_argument("--json", action="store_true", help="print the report as one JSON object")
    q.add_argument("--push-to-hub", metavar="REPO_ID",
                   help="then upload the result to this Hub repo (as `llmquant push`; id and token checked first)")
    q.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    q.add_argument("--license", help="with --push-to-hub: the card's license, if the base model's card lacks one")

    e = sub.add_parser("eval", help="perplexity, KLD / top-1 against a base model, task accuracy", epilog=EPILOG,
                       description="Score PATH on non-overlapping windows of a text; with --base, also the mean "
                                   "KL divergence and top-1 agreement against the base model's predictions. "
                                   "--tasks adds lm-evaluation-harness accuracy (and retention against --base); "
                                   "--card keeps the results beside PATH and puts them in its model card.")
    e.add_argument("paths", metavar="PATH", nargs="+",
                   help="packed or float checkpoint, GGUF file, or 'demo'; several are scored on the same windows, "
                        "the base model running once for all")
    _add_eval_args(e)
    e.add_argument("--base", metavar="MODEL", help="float model to compare against")
    e.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    e.add_argument("--speed", action="store_true",
                   help="also measure inference speed and memory against --base (as `llmquant bench`)")
    _add_speed_args(e)
    e.add_argument("--tasks", metavar="T1,T2",
                   help="lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy): accuracy, and with "
                        "--base the base's and the retention (quantized / base). Needs pip install "
                        "'llmquant[eval]'; offline, a task needs local data (see --tasks-path)")
    e.add_argument("--tasks-path", metavar="DIR", help="a folder of lm-eval task definitions (YAML) to add to its own")
    e.add_argument("--limit", type=int, metavar="N", help="score only the first N documents of each task")
    e.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples per task (default: the task's)")
    e.add_argument("--card", action="store_true",
                   help="record the results beside PATH (one packed folder or GGUF file) and refresh its model card")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    g = sub.add_parser("generate", help="generate text from a packed or float checkpoint")
    g.add_argument("path", metavar="PATH")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--device", default="cpu")
    _add_compile_arg(g)

    b = sub.add_parser("bench", help="inference speed and memory of a model, and of its base beside it",
                       epilog=EPILOG,
                       description="Measure PATH's prefill and decode tokens/s, time to first token, resident "
                                   "memory once loaded and peak memory, each model in a process of its own; "
                                   "with --base, the float model too (on the CPU in bfloat16 and in float32) and "
                                   "the ratios against its faster figures.")
    b.add_argument("path", metavar="PATH", help="packed or float checkpoint, GGUF file, or 'demo'")
    b.add_argument("--base", metavar="MODEL", help="float model to compare against")
    _add_speed_args(b)
    b.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    b.add_argument("--json", action="store_true", help="print one JSON object")

    i = sub.add_parser("inspect", help="show a packed checkpoint's (or GGUF file's) settings and size")
    i.add_argument("path", metavar="PATH")
    i.add_argument("--json", action="store_true")
    i.add_argument("--layers", action="store_true",
                   help="also list every packed linear: its bits and group size (mixed precision: bytes, and the "
                        "predicted cost and the solver's achieved cost from quant_report.json)")

    p = sub.add_parser("push", help="upload a packed folder or GGUF file to the Hugging Face Hub, with its card",
                       description="Upload PATH (a packed folder, a GGUF file, or a folder of GGUF files) to the Hub "
                                   "repo REPO_ID in one commit, "
                                   "with a fresh model card (README.md). The repo is created if needed; the token is "
                                   "HF_TOKEN or the saved login (`hf auth login`), never printed. The checkpoint is "
                                   "validated first and only read.")
    p.add_argument("path", metavar="PATH", help="what `llmquant quantize` wrote (--out)")
    p.add_argument("repo_id", metavar="REPO_ID", help="user/name or org/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to commit to (default: main)")
    p.add_argument("--license", help="the card's license, when the base model's card does not give it")
    p.add_argument("--base-model", help="the base model's Hub id, when PATH does not say it")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded and show the card; upload nothing")

    sub.add_parser("demo-model", help="build (once) and print the path of the demo model")
    return parser


def _eval_text(data: str) -> str:
    from .calibration import load_text

    return load_text(data, split="test")


def _load_exact(paths, base, device):
    """({path: (model, tokenizer)}, (base model, tokenizer) or None), each loaded once, on the exact path quality
    measurements use (float32, packed layers dequantized per call)."""
    from .api import load_any

    return ({str(p): load_any(p, device, exact=True) for p in paths},
            load_any(base, device, exact=True) if base else None)


def _evaluate(loaded: dict, base, data_text, seqlen, windows):
    """{path: EvalResult}; the tokenizer of the first path cuts the windows for all."""
    from .eval import evaluate_many

    tokenizer = next(iter(loaded.values()))[1]
    models = {p: model for p, (model, _) in loaded.items()}
    return evaluate_many(models, tokenizer, data_text, seqlen=seqlen, windows=windows,
                         base=base[0] if base else None)


def _print_report(report, config, args, result) -> None:
    if report.gguf_types:
        counts = collections.Counter(t for name, t in report.gguf_types.items() if name.endswith(".weight"))
        print(f"wrote {report.out}: GGUF {config.gguf_type} by {config.method}; {_type_summary(counts)}")
    elif report.allocation:
        print(f"wrote {report.out}: {report.quantized_linears} linears, mixed precision, "
              f"{'sym' if report.sym else 'asym'}")
    else:
        print(f"wrote {report.out}: {report.quantized_linears} linears at {report.bits} bits, group "
              f"{report.group_size}, {'sym' if report.sym else 'asym'}")
    if report.allocation:
        a = report.allocation
        counts = collections.Counter(u["setting"] for u in a["linears"].values())
        print(f"  allocated {a['bpw']:.3f} bits per weight of the linears for --target-bpw {config.target_bpw} in "
              f"{a['seconds']:.0f} s (predicted KLD {a['predicted_kld']:.4f}): {_type_summary(counts)}")
    print(f"  size {report.size_bytes / 2**20:.1f} MiB, {report.bpw:.3f} bits per quantized weight, "
          f"{report.bits_per_parameter:.3f} bits per parameter over the whole output, {report.seconds:.1f} s")
    if report.peak_gpu_bytes is not None:
        print(f"  peak GPU memory {report.peak_gpu_bytes / 2**20:.0f} MiB")
    if report.skipped:
        print(f"  left in float ({len(report.skipped)}): {', '.join(report.skipped[:4])}"
              f"{' ...' if len(report.skipped) > 4 else ''}")
    if args.eval:
        ev = result["eval"]
        print(f"  ppl {ev['ppl']:.4f}, KLD {ev['kld']:.5f}, top-1 {ev['top1']:.4f} "
              f"({ev['windows']} windows x {args.eval_seqlen} tokens)")
        _print_speed(result["speed"])


def cmd_quantize(args) -> None:
    from .api import QuantConfig, quantize

    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    config = QuantConfig(**{name: value for name, value in vars(args).items() if name in fields})
    config.gguf_type = config.gguf_type.upper()
    config.validate()
    text = _eval_text(args.eval_data) if args.eval else None  # fail before the long work, not after
    if args.eval:
        from .speed import check_lengths

        check_lengths(args.prompt_tokens, args.new_tokens)
    if args.dry_run_allocation and config.target_bpw is None:
        raise UserError("--dry-run-allocation prints the plan of --target-bpw; give one")
    if args.calib and config.method == "rtn" and config.target_bpw is None:
        print("note: rtn uses no calibration data; --calib is ignored", file=sys.stderr)
    if args.push_to_hub:
        from .publish import check_destination

        check_destination(args.push_to_hub)
    report = quantize(args.model, config, args.out, force=args.force, work_dir=args.work_dir, resume=args.resume,
                      dry_run_allocation=args.dry_run_allocation)
    if report is None:  # --dry-run-allocation: the plan is printed
        return
    result = report.to_dict()
    if args.eval:
        from .publish import record_eval

        ev = _evaluate(*_load_exact([args.out], args.model, args.device), text, args.eval_seqlen, args.eval_windows)
        result["eval"] = ev[str(args.out)].to_dict()
        result["speed"] = _bench(args, args.out, args.model)
        record_eval(args.out, {**result["eval"], "speed": result["speed"]}, args.eval_data, args.eval_seqlen,
                    args.eval_windows, args.model)
    if args.json:
        print(json.dumps(result))
    else:
        _print_report(report, config, args, result)
    if args.push_to_hub:
        from .publish import push

        say = (lambda line: print(line, file=sys.stderr)) if args.json else None  # stdout stays one JSON object
        push(args.out, args.push_to_hub, private=args.private, license=args.license, out=say)


def cmd_eval(args) -> None:
    from .api import check_device

    check_device(args.device)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:
        raise UserError("--tasks names no task")
    if args.card:
        _check_card_target(args.paths)
    manager = None
    if tasks:  # unknown names and a missing lm-eval are one line, before any model is loaded
        from .tasks import task_manager

        manager = task_manager(tasks, args.tasks_path)
    data = args.data or (None if tasks else "wikitext2")
    text = _eval_text(data) if data else None  # a missing text fails before any model loads
    dicts = {str(p): {} for p in args.paths}
    loaded, base = _load_exact(args.paths, args.base, args.device)
    if data:
        for path, result in _evaluate(loaded, base, text, args.seqlen, args.windows).items():
            dicts[path].update(result.to_dict())
    if tasks:
        from .tasks import run_tasks, with_retention

        def score(model, tokenizer):
            return run_tasks(model, tokenizer, tasks, manager, limit=args.limit, num_fewshot=args.num_fewshot)

        base_scores = score(*base) if base else None
        for path, (model, tokenizer) in loaded.items():
            dicts[path]["tasks"] = with_retention(score(model, tokenizer), base_scores)
    del loaded, base  # the speed runs measure models in processes of their own: free this one's memory first
    if args.speed:
        for p in args.paths:
            dicts[str(p)]["speed"] = _bench(args, p, args.base)
    if args.card:
        from .publish import record_eval

        record_eval(args.paths[0], dicts[str(args.paths[0])], data, args.seqlen, args.windows, args.base)
    if args.json:  # one object: the result itself, or {path: result} for several paths
        print(json.dumps(next(iter(dicts.values())) if len(dicts) == 1 else dicts))
        return
    for path, result in dicts.items():
        say = (lambda line: print(f"{path}: {line}")) if len(dicts) > 1 else print
        if "ppl" in result:
            line = f"ppl {result['ppl']:.4f} over {result['tokens']} tokens ({result['windows']} windows of {args.seqlen})"
            if result["kld"] is not None:
                line += f"; KLD {result['kld']:.5f}, top-1 agreement {result['top1']:.4f}"
            say(line)
        for task, r in result.get("tasks", {}).get("results", {}).items():
            kept = f" (base {r['base']:.4f}, retention {r['retention']:.3f})" if r.get("retention") is not None else ""
            say(f"{task}: {r['metric']} {r['value']:.4f} +- {r['stderr']:.4f}{kept}")
        if args.speed:
            _print_speed(result["speed"])
    if args.card:
        print(f"recorded in {args.paths[0]}'s model card", file=sys.stderr)


def _check_card_target(paths) -> None:
    """--card writes beside one quantized output: never into a float model's folder."""
    from .api import is_quantized
    from .formats.gguf.reader import is_gguf

    if len(paths) != 1:
        raise UserError("--card records the results of one PATH; give one")
    path = Path(paths[0])
    if not (is_gguf(path) or (path.is_dir() and is_quantized(path))):
        raise UserError(f"--card records results beside a packed folder or GGUF file written by llmquant, not {path}")


def _bench(args, path, base) -> dict:
    from .speed import bench

    return bench(str(path), base, args.prompt_tokens, args.new_tokens, args.device, compiled=args.compile)


def _print_speed(result: dict) -> None:
    rows = [result["model"], *result["base"]]
    width = max(len(r["path"]) for r in rows)
    print(f"  {'model':<{width}}  {'dtype':<8}  {'loaded':>9}  {'peak':>9}  {'load':>6}  {'warm-up':>7}  "
          f"{'TTFT':>7}  {'prefill':>10}  {'decode':>10}")
    for r in rows:
        print(f"  {r['path']:<{width}}  {r['dtype']:<8}  {r['rss_loaded_bytes'] / 2**20:>5.0f} MiB  "
              f"{r['peak_rss_bytes'] / 2**20:>5.0f} MiB  {r['load_s']:>5.1f}s  {r['warmup_s']:>6.1f}s  "
              f"{r['ttft_s']:>6.2f}s  {r['prefill_tokens_per_s']:>6.1f} t/s  {r['decode_tokens_per_s']:>6.2f} t/s")
    if result["base"]:
        print(f"  against the base's faster figures: decode {result['decode_speedup']:.2f}x, prefill "
              f"{result['prefill_speedup']:.2f}x, resident memory {result['memory_ratio']:.2f}x "
              f"({rows[0]['prompt_tokens']}-token prompt, {rows[0]['new_tokens']} new tokens)")


def cmd_bench(args) -> None:
    from .api import check_device

    check_device(args.device)
    result = _bench(args, args.path, args.base)
    if args.json:
        print(json.dumps(result))
        return
    _print_speed(result)


def cmd_generate(args) -> None:
    import torch

    from .api import check_device, load_any
    from .speed import TimedStreamer, generation_options

    check_device(args.device)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if not args.prompt.strip() and not args.chat:
        raise UserError("--prompt is empty: give the text to continue")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more, not {args.temperature}")
    model, tokenizer = load_any(args.path, args.device)
    if args.chat and not tokenizer.chat_template:
        raise UserError(f"{args.path}: its tokenizer has no chat template; drop --chat")
    if args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    ids = ids.to(args.device)
    streamer = TimedStreamer(tokenizer, skip_prompt=args.chat, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, streamer=streamer,
                             pad_token_id=tokenizer.eos_token_id, **sampling, **generation_options(args.compile))
    new = out.shape[1] - ids.shape[1]
    print(f"\n[prefill {ids.shape[1]} tokens at {streamer.prefill_rate(ids.shape[1]):.1f} tokens/s; "
          f"decode {new} tokens at {streamer.decode_rate(new):.1f} tokens/s]", file=sys.stderr)


def _type_summary(counts: dict[str, int]) -> str:
    """'Q4_K x120, Q6_K x15': a GGUF mix as it came out."""
    return ", ".join(f"{t} x{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def cmd_inspect(args) -> None:
    from .formats.gguf.reader import describe_gguf, is_gguf
    from .formats.hf import describe
    from .models.loader import resolve_model

    info = describe_gguf(args.path) if is_gguf(args.path) else describe(resolve_model(args.path))
    if args.json:
        print(json.dumps(info))
        return
    if info.get("format") == "gguf":
        types = _type_summary(info["tensor_types"])
        print(f"{info['path']}: GGUF v{info['version']} {info['architecture']} ({info['name']}), mix {info['mix']}, "
              f"{info['blocks']} blocks, tokenizer {info['tokenizer']}")
        print(f"  matrices: {types}; {info['quantized_weights']:,} weights, {info['bpw']:.3f} bits per weight")
        print(f"  {info['tensors']} tensors, {info['size_bytes'] / 2**20:.1f} MiB")
        _print_serving(info["serving"])
        return
    layout = f", {info['checkpoint_format']}" if info["checkpoint_format"] else ""
    print(f"{info['path']}: {info['quant_method']}{layout} {info['bits']}-bit, group {info['group_size']}, "
          f"{'sym' if info['sym'] else 'asym'}, desc_act={info['desc_act']}, static_groups={info['static_groups']}")
    print(f"  {info['quantized_linears']} quantized linears, {info['quantized_weights']:,} weights, "
          f"{info['bpw']:.3f} bits per quantized weight; {info['parameters']:,} parameters, "
          f"{info['bits_per_parameter']:.3f} bits per parameter over the whole checkpoint")
    print(f"  {info['tensors']} tensors in {info['files']} file(s), {info['size_bytes'] / 2**20:.1f} MiB")
    if info["meta"]:
        print(f"  meta: {json.dumps(info['meta'])}")
    if info["mixed"]:
        print(f"  mixed precision (per-layer settings in `dynamic`): {info['mixed']}"
              f"{'' if args.layers else '; --layers lists them'}")
    if args.layers:
        for name, layer in info["layers"].items():
            costs = "".join(f", {key.replace('_', ' ')} {layer[key]:.2e}" for key in ("predicted_kld", "kld_estimate")
                            if key in layer)
            print(f"    {name}: W{layer['bits']} g{layer['group_size']}, {layer['bytes']:,} B{costs}")
    _print_serving(info["serving"])


def _print_serving(runtimes: list[dict]) -> None:
    print("  runs on:")
    for r in runtimes:
        print(f"    {r['name']}: {'yes' if r['loads'] else 'no'} - {r['how']}")


def cmd_demo_model(args) -> None:
    from .models.demo import demo_model_path

    print(demo_model_path())


def cmd_push(args) -> None:
    from .publish import push

    push(args.path, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run,
         license=args.license, base_model=args.base_model)


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate, "bench": cmd_bench,
            "inspect": cmd_inspect, "push": cmd_push, "demo-model": cmd_demo_model}


def _say_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """llmquant's own warnings as one line on stderr; other libraries' keep their usual form."""
    if str(filename).startswith(os.path.dirname(__file__)):
        print(f"llmquant: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _say_warning
            COMMANDS[args.command](args)
    except Exception as err:  # every failure a user can act on is one line; a bug keeps its traceback
        line = one_line(err)
        if line is None:
            raise
        print(f"llmquant: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmquant: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
