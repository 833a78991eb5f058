"""Quality table on the measurement protocol (DESIGN.md): quantize MODEL with each setting, evaluate
ppl / KLD / top-1 against the float model, print a markdown table and write JSON.

    python scripts/quality_table.py --model demo --data ../shared/data/wikitext2/test.raw.txt \
        --calib ../shared/data/wikitext2/valid.tokens.txt --configs rtn:8:128:sym rtn:4:128:asym

A config is METHOD:BITS:GROUP:SYM[:extra flags separated by commas], e.g. gptq:4:128:asym:--act-order.
Each quantization runs as its own process through the CLI, so its wall time and peak RSS are the whole
command's (2 threads); then one `llmquant eval` scores the base and every result on the same windows (the base runs once).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from timed import run_timed


def run_cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "llmquant", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llmquant {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def quantize_timed(*args: str) -> tuple[dict, float, int]:
    """The CLI's --json report, wall seconds and peak RSS bytes of one `llmquant quantize`."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            seconds, rss = run_timed([sys.executable, "-m", "llmquant", "quantize", *args], out, err)
        except subprocess.CalledProcessError:
            err.seek(0)
            raise SystemExit(f"llmquant quantize {' '.join(args)} failed:\n{err.read()[-2000:]}") from None
        out.seek(0)
        return json.loads(out.read()), seconds, rss


def evaluate(paths: list[str], args) -> dict:
    cmd = ["eval", *paths, "--data", args.data, "--seqlen", str(args.seqlen), "--windows", str(args.windows),
           "--base", args.model, "--json"]
    return json.loads(run_cli(*cmd))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", required=True, help="evaluation text file")
    parser.add_argument("--calib", default=None, help="calibration file for calibrated methods")
    parser.add_argument("--n-samples", default="128")
    parser.add_argument("--calib-seqlen", default="512")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--work", default="/tmp/llmquant-quality")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()

    rows = [{"config": "base", "path": args.model}]
    for config in args.configs:
        method, bits, group, sym, *extra = config.split(":")
        out = str(Path(args.work) / config.replace(":", "_").replace(",", "_").replace("-", ""))
        cmd = [args.model, "--method", method, "--bits", bits, "--group-size", group, f"--{sym}",
               "--out", out, "--force", "--json", "--n-samples", args.n_samples, "--seqlen", args.calib_seqlen]
        if args.calib:
            cmd += ["--calib", args.calib]
        cmd += [flag for e in extra for flag in e.split(",") if flag]
        report, seconds, rss = quantize_timed(*cmd)
        rows.append({"config": config, "path": out, "quantize_s": round(seconds, 1), "peak_rss_mb": round(rss / 2**20),
                     "bpw": report["bpw"], "size_mib": report["size_bytes"] / 2**20})
        print(json.dumps(rows[-1]), file=sys.stderr)
    results = evaluate([r["path"] for r in rows], args)
    for r in rows:
        r.update(results[r["path"]])
    base_ppl = rows[0]["ppl"]
    print("| config | bpw | ppl | Δppl vs base | KLD | top-1 | quantize s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        kld = f"{r['kld']:.5f}" if r.get("kld") is not None else "–"
        top1 = f"{r['top1']:.4f}" if r.get("top1") is not None else "–"
        print(f"| {r['config']} | {r.get('bpw') or 16:.3f} | {r['ppl']:.4f} | {100 * (r['ppl'] / base_ppl - 1):+.2f}% "
              f"| {kld} | {top1} | {r.get('quantize_s', '–')} | {r.get('peak_rss_mb', '–')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
