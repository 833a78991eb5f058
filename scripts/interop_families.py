"""Every declared dense family through transformers' own GPTQ loader: a tiny random model of the family
(tests/tiny.py, 256 wide, 2 blocks) quantized with GPTQ W4 g32 asym, then `scripts/interop_gptq.py --peer
transformers --transformers-backend torch` run in the peer's venv (its docstring says how to make it).

    python scripts/interop_families.py --peer-python /tmp/venv-gptqmodel/bin/python [--root /tmp/interop]

Prints one line per family (the peer's weight and logit checks) and exits 1 if any family fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    from tiny import FAMILY_EXTRA, MOE, make_tiny_model, sample_text

    from llmquant.api import QuantConfig, quantize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", required=True, help="python of the venv with gptqmodel and optimum")
    parser.add_argument("--root", type=Path, default=Path("/tmp/interop"))
    args = parser.parse_args()
    failed = []
    for family in sorted(set(FAMILY_EXTRA) - MOE):
        root = args.root / family
        src = make_tiny_model(root / "src", family, hidden=256, intermediate=512)
        (root / "calib.txt").write_text(sample_text(6000, seed=5))
        (root / "text.txt").write_text(sample_text(3000, seed=9))
        config = QuantConfig(method="gptq", bits=4, group_size=32, sym=False, calib=str(root / "calib.txt"),
                             n_samples=8, seqlen=64)
        quantize(src, config, root / "q", progress=False, force=True)
        run = subprocess.run([args.peer_python, str(REPO / "scripts/interop_gptq.py"), str(root / "q"), "--text",
                              str(root / "text.txt"), "--tokens", "64", "--peer", "transformers",
                              "--transformers-backend", "torch"], capture_output=True, text=True,
                             env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
        lines = [line.strip() for line in run.stdout.splitlines() if "weights:" in line or "logits vs ours fp32" in line]
        print(f"{family:12s} {'ok' if run.returncode == 0 else 'FAILED'}  " + " | ".join(lines), flush=True)
        if run.returncode:
            failed.append(family)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
