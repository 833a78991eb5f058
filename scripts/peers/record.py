"""Evaluate finished peer runs with our evaluator and append one JSON line per run to the results file.

For each NAME: the checkpoint /tmp/peers/out/NAME, its `/usr/bin/time -v` report /tmp/peers/logs/NAME.time
(written by run1.sh), converted by to_float.py in the venv that can read it, then all NAMEs are scored in
one `llmquant eval` (the base model runs once per window for all of them). Run in our venv from /work/main:
  python scripts/peers/record.py NAME [NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path("/tmp/peers")
HERE = Path(__file__).resolve().parent
EVAL_DATA = "/work/shared/data/wikitext2/test.raw.txt"
CONVERTER_VENV = {"compressed-tensors": ROOT / "venv-llmc/bin/python"}  # others: this interpreter


def time_report(path: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) from a GNU time -v report."""
    text = path.read_text()
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    wall = 0.0
    for part in clock.split(":"):
        wall = wall * 60 + float(part)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return wall, rss_kb / 1024


def config_label(settings: dict) -> str:
    grid = settings.get("group_size") or (settings.get("block_structure") or [0, 0])[1]
    label = f"W{settings['bits']} g{grid} {'sym' if settings['sym'] else 'asym'}"
    if settings.get("desc_act"):
        label += " desc_act"
    elif "act_group_aware" in settings:
        label += " gar" if settings["act_group_aware"] else " plain"
    if settings.get("actorder"):
        label += f" actorder={settings['actorder']}"
    if "iters" in settings:
        label += f" iters={settings['iters']}"
    return label


def to_float(name: str) -> Path:
    src, dst = ROOT / "out" / name, ROOT / "float" / name
    qconfig = json.loads((src / "config.json").read_text()).get("quantization_config", {})
    python = CONVERTER_VENV.get(qconfig.get("quant_method"), Path(sys.executable))
    env = dict(os.environ, PYTHONPATH="/work/main", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    subprocess.run(["nice", "-n", "15", str(python), str(HERE / "to_float.py"), str(src), str(dst)],
                   check=True, env=env)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+")
    parser.add_argument("--results", type=Path, default=ROOT / "results.jsonl")
    parser.add_argument("--windows", type=int, default=32, help="eval windows (the protocol's 32; fewer to smoke-test)")
    parser.add_argument("--keep-float", action="store_true", help="keep the float32 copies (540 MB each)")
    args = parser.parse_args()
    from llmquant.models.demo import demo_model_path

    floats = {name: to_float(name) for name in args.names}
    cmd = [sys.executable, "-m", "llmquant", "eval", *map(str, floats.values()), "--data", EVAL_DATA,
           "--seqlen", "1024", "--windows", str(args.windows), "--base", str(demo_model_path()), "--json"]
    proc = subprocess.run(["nice", "-n", "15", *cmd], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1"))
    if proc.returncode:
        raise SystemExit(f"eval failed:\n{proc.stderr[-3000:]}")
    scores = json.loads(proc.stdout)
    if len(floats) == 1 and "ppl" in scores:
        scores = {str(next(iter(floats.values()))): scores}
    with args.results.open("a") as f:
        for name, path in floats.items():
            run = json.loads((ROOT / "out" / name / "peer_run.json").read_text())
            wall, rss = time_report(ROOT / "logs" / f"{name}.time")
            ev = scores[str(path)]
            row = {"peer": run["peer"], "config": config_label(run["settings"]), "wall_s": round(wall, 1),
                   "peak_rss_mb": round(rss), "ppl": ev["ppl"], "kld": ev["kld"], "top1": ev["top1"],
                   "out_dir": str(ROOT / "out" / name), "quantize_s": run["quantize_s"]}
            f.write(json.dumps(row) + "\n")
            print(json.dumps(row))
            if not args.keep_float:
                shutil.rmtree(path)


if __name__ == "__main__":
    main()
