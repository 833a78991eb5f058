"""Wall time and peak RSS of whole `llmquant quantize` commands (each its own process).

    python scripts/bench_quantize.py --model demo --repeat 3 -- --method rtn --bits 4 --group-size 128 --asym
    python scripts/bench_quantize.py --model demo -- --method gptq --bits 4 --group-size 128 \
        --calib ../shared/data/wikitext2/valid.tokens.txt --n-samples 128 --seqlen 512

Everything after `--` goes to `llmquant quantize`. Prints min/median/max wall seconds and peak RSS, and with
`--device cuda` the peak GPU memory the run reports; for a local checkpoint also its parameter count and the
median seconds per billion parameters (to compare a mixture of experts with a dense model of the same size).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile

from timed import run_timed


def run_once(model: str, flags: list[str], threads: int | None) -> tuple[float, float, float | None]:
    """(wall seconds, peak RSS in MiB, peak GPU MiB or None) of one quantize process."""
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile("w+") as out, \
            tempfile.TemporaryFile("w+") as log:
        cmd = [sys.executable, "-m", "llmquant", "quantize", model, "--out", f"{tmp}/out", *flags, "--json"]
        try:
            wall, rss = run_timed(cmd, out, log, threads=threads)
        except subprocess.CalledProcessError:
            log.seek(0)
            raise SystemExit(f"quantize failed:\n{log.read()[-2000:]}") from None
        out.seek(0)
        gpu = json.loads(out.read().strip().splitlines()[-1]).get("peak_gpu_bytes")
        return wall, rss / 2**20, gpu / 2**20 if gpu is not None else None


def parameter_count(model: str) -> int | None:
    """Parameters stored in a local checkpoint's safetensors files (from the headers alone)."""
    from pathlib import Path

    from safetensors import safe_open

    files = sorted(Path(model).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(f, "pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                total += math.prod(shape)
    return total


def main() -> None:
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the command")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    runs = [run_once(args.model, flags, args.threads) for _ in range(args.repeat)]
    walls, rss, gpu = [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs if r[2] is not None]
    result = {"command": ["llmquant", "quantize", args.model, *flags], "runs": args.repeat,
              "wall_s": {"min": min(walls), "median": statistics.median(walls), "max": max(walls)},
              "peak_rss_mib": max(rss), **({"peak_gpu_mib": max(gpu)} if gpu else {})}
    params = parameter_count(args.model)
    if params:
        result.update(params=params, wall_s_per_billion_params=statistics.median(walls) / params * 1e9)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
