"""GGUF side by side with llama.cpp's own quantizer, on the demo model (or any float checkpoint).

For each mix: llama-quantize without and with an importance matrix (llama-imatrix on the same
calibration text), and llmquant's reference, imatrix and GPTQ encoders, all from the same F32 GGUF
that llmquant writes. Reports per mix: whether llmquant's reference file has llama-quantize's
tensor types and bytes, wall time and peak RSS of both (whole process, 2 threads), and, with --eval-data, ppl
and KLD vs the float model of every file through llmquant's evaluator (our block decoders).

    bash scripts/build_llama_cpp.sh   # once, ~10 min on 2 cores
    python scripts/gguf_vs_llama_cpp.py --mixes Q4_K_M Q3_K_M Q2_K \
        --calib ../shared/data/wikitext2/valid.tokens.txt --eval-data ../shared/data/wikitext2/test.raw.txt

Results: a JSON line per file in OUT/results.jsonl and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from timed import run_timed

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one whole process; its output goes to `log`."""
    with open(log, "w") as f:
        return run_timed(cmd, f)


def tensor_bytes(path: Path) -> dict[str, tuple[str, bytes]]:
    from llmquant.formats.gguf.validate import check_gguf

    s = check_gguf(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    return {t.name: (t.type, mm[s.data_offset + t.offset:s.data_offset + t.offset + t.nbytes].tobytes())
            for t in s.tensors}


def tensors_digest(path: Path) -> str:
    """What the evaluator reads of a file (its tensors' names, types and bytes), not its metadata."""
    digest = hashlib.sha256()
    for name, (kind, data) in sorted(tensor_bytes(path).items()):
        digest.update(f"{name}:{kind}:".encode() + data)
    return digest.hexdigest()


def compare(ours: Path, theirs: Path) -> dict:
    a, b = tensor_bytes(ours), tensor_bytes(theirs)
    common = sorted(set(a) & set(b))
    return {"tensors": len(common), "missing": sorted(set(a) ^ set(b)),
            "type_mismatch": [n for n in common if a[n][0] != b[n][0]],
            "byte_mismatch": [n for n in common if a[n] != b[n]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--mixes", nargs="+", default=["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M",
                                                  "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"])
    p.add_argument("--calib", help="calibration text for both imatrix tools (omit: no imatrix rows)")
    p.add_argument("--methods", nargs="+", default=["imatrix", "gptq"],
                   help="calibrated llmquant methods to run, each METHOD[:FLAG,...], e.g. gptq:--float-targets")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-data", help="evaluation text; omit to skip ppl/KLD")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--out", default=str(Path.home() / ".cache/llmquant/gguf-compare"))
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(subprocess.run(["bash", str(REPO / "scripts/build_llama_cpp.sh"), "--print-bin"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    if not (bin_dir / "llama-quantize").exists():
        sys.exit("llama.cpp tools missing: run `bash scripts/build_llama_cpp.sh` first")
    llmquant = [sys.executable, "-m", "llmquant", "quantize", args.model, "--method", "rtn", "--format", "gguf", "--force"]
    f32 = out / "model-F32.gguf"
    if not f32.exists():
        run([*llmquant, "--gguf-type", "F32", "--out", str(f32)], out / "f32.log")
    imatrix = out / "imatrix.gguf"
    if args.calib and not imatrix.exists():
        run([str(bin_dir / "llama-imatrix"), "-m", str(f32), "-f", args.calib, "-o", str(imatrix), "-c",
             str(args.seqlen), "--chunks", str(args.n_samples), "-t", "2"], out / "imatrix.log")
    calib = ["--calib", args.calib, "--n-samples", str(args.n_samples), "--seqlen", str(args.seqlen)]
    rows = []
    for mix in args.mixes:
        q = str(bin_dir / "llama-quantize")
        files = {"llama.cpp": ([q, str(f32), str(out / f"llama-{mix}.gguf"), mix, "2"], out / f"llama-{mix}.gguf"),
                 "llmquant": ([*llmquant, "--gguf-type", mix, "--out", str(out / f"ours-{mix}.gguf")],
                              out / f"ours-{mix}.gguf")}
        if args.calib:
            files["llama.cpp imatrix"] = ([q, "--imatrix", str(imatrix), str(f32), str(out / f"llama-imx-{mix}.gguf"),
                                           mix, "2"], out / f"llama-imx-{mix}.gguf")
            for spec in args.methods:
                method, *flags = spec.replace(",", ":").split(":")
                path = out / f"ours-{'-'.join([method, *(f.lstrip('-') for f in flags)])}-{mix}.gguf"
                files[f"llmquant {' '.join([method, *flags])}"] = (
                    [*llmquant, "--gguf-type", mix, "--method", method, *flags, *calib, "--out", str(path)], path)
        for who, (cmd, path) in files.items():
            seconds, rss = run(cmd, out / f"{path.stem}.log")
            rows.append({"mix": mix, "who": who, "file": str(path), "seconds": round(seconds, 2),
                         "peak_rss_mb": round(rss / 2**20), "size_bytes": path.stat().st_size})
        same = compare(out / f"ours-{mix}.gguf", out / f"llama-{mix}.gguf")
        rows[-len(files) + 1]["vs_llama_cpp"] = same
        print(f"{mix}: reference encoder vs llama-quantize: {same['tensors']} tensors, "
              f"{len(same['type_mismatch'])} type mismatches, {len(same['byte_mismatch'])} byte mismatches",
              file=sys.stderr)
    if args.eval_data:
        # files with the same tensors score the same (our reference encoder and llama-quantize; an imatrix that a
        # type ignores, as Q8_0 does): each distinct set of tensors is evaluated once
        first: dict[str, str] = {}
        twin = {r["file"]: first.setdefault(tensors_digest(Path(r["file"])), r["file"]) for r in rows}
        scored = list(first.values())
        cmd = [sys.executable, "-m", "llmquant", "eval", *scored, "--base", args.model, "--data",
               args.eval_data, "--windows", str(args.windows), "--seqlen", str(args.eval_seqlen), "--json"]
        result = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        scores = json.loads(result.strip().splitlines()[-1])
        scores = scores if len(scored) > 1 else {scored[0]: scores}
        for r in rows:
            r.update({k: scores[twin[r["file"]]][k] for k in ("ppl", "kld", "top1")})
    with open(out / "results.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print("| mix | quantizer | MiB | seconds | peak RSS MiB | ppl | KLD | top-1 |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        ppl, kld, top1 = (r.get(k, float("nan")) for k in ("ppl", "kld", "top1"))
        print(f"| {r['mix']} | {r['who']} | {r['size_bytes'] / 2**20:.2f} | {r['seconds']:.1f} | {r['peak_rss_mb']} | "
              f"{ppl:.4f} | {kld:.5f} | {top1:.4f} |")


if __name__ == "__main__":
    main()
