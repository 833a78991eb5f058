"""kill -9 in the middle of a run (GPTQ, AWQ+GPTQ, GPTQ onto GGUF blocks, GPTQ with float targets or tuning), then
--resume: the result is byte-identical to an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmquant.cli import main
from tiny import make_tiny_model, sample_text


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = make_tiny_model(root / "model", layers=6)
    calib = root / "calib.txt"
    calib.write_text(sample_text(8000, seed=3))
    return root, model, calib


RUNS = {  # what a run writes, and the flags that make it
    "gptq": ("dir", ["--method", "gptq", "--bits", "3", "--group-size", "32", "--asym", "--act-order"]),
    # AWQ folds scales into norms and biases: a resumed run must restore them for the blocks it skips
    "awq+gptq": ("dir", ["--method", "awq+gptq", "--format", "awq", "--bits", "4", "--group-size", "32", "--asym"]),
    "gguf-gptq": ("file", ["--method", "gptq", "--format", "gguf", "--gguf-type", "Q4_K_M"]),
    # float targets carry a second stream of activations, which the record must hold too
    "gptq-float-targets": ("dir", ["--method", "gptq", "--bits", "2", "--group-size", "32", "--float-targets"]),
    # block-wise tuning draws random batches: a resumed run must draw the same ones for the blocks it solves
    "gptq-tuned": ("dir", ["--method", "gptq", "--bits", "3", "--group-size", "32", "--tune-iters", "4"]),
}


def args(model, calib, out, *extra, run="gptq"):
    return ["quantize", str(model), *RUNS[run][1], "--calib", str(calib), "--n-samples", "24", "--seqlen", "64",
            "--out", str(out), *extra]


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every file written, the report without its timings (the one thing a resumed run may change)."""
    files = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else {"file": out.read_bytes()}
    if "quant_report.json" in files:
        report = json.loads(files["quant_report.json"])
        for entry in report["linears"].values():
            for key in [k for k in entry if "seconds" in k]:
                del entry[key]
        files["quant_report.json"] = json.dumps(report).encode()
    return files


@pytest.mark.parametrize("run", RUNS)
def test_kill_and_resume_is_byte_identical(setup, capsys, run):
    root, model, calib = setup
    suffix = ".gguf" if RUNS[run][0] == "file" else ""
    reference, out, work = root / f"reference-{run}{suffix}", root / f"resumed-{run}{suffix}", root / f"work-{run}"
    assert main(args(model, calib, reference, run=run)) == 0
    kill_after = random.randint(0, 3)  # the block whose record triggers the kill
    proc = subprocess.Popen([sys.executable, "-m", "llmquant", *args(model, calib, out, "--work-dir", str(work),
                                                                     run=run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = work / f"block-{kill_after:05d}.safetensors"
    deadline = time.time() + 600
    while not record.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before block {kill_after} was recorded"
    assert not out.exists()
    assert main(args(model, calib, out, "--work-dir", str(work), "--resume", run=run)) == 0
    want, got = output_bytes(reference), output_bytes(out)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    capsys.readouterr()


def test_resume_refuses_a_different_run(setup, capsys):
    root, model, calib = setup
    work = root / "work2"
    assert main(args(model, calib, root / "a", "--work-dir", str(work))) == 0
    assert main([*args(model, calib, root / "b", "--work-dir", str(work), "--resume"), "--bits", "4"]) == 2
    assert "different settings" in capsys.readouterr().err
    assert main(args(model, calib, root / "c", "--work-dir", str(work))) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(args(model, calib, root / "d", "--resume")) == 2
    assert "--work-dir" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["fingerprint.json", "block-00001.safetensors"])
def test_a_damaged_work_dir_is_one_line(damage, setup, capsys):
    """A truncated fingerprint or block record: named in one line, never a traceback."""
    root, model, calib = setup
    work = root / f"work-{damage}"
    assert main(args(model, calib, root / f"e-{damage}", "--work-dir", str(work))) == 0
    target = work / damage
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    capsys.readouterr()
    code = main(args(model, calib, root / f"f-{damage}", "--work-dir", str(work), "--resume"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("llmquant: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert target.name in lines[0] and "damaged" in lines[0]
    assert not (root / f"f-{damage}").exists()
