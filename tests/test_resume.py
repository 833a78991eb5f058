"""kill -9 in the middle of a GPTQ run, then --resume: the result is byte-identical to an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time

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


def args(model, calib, out, *extra):
    return ["quantize", str(model), "--method", "gptq", "--bits", "3", "--group-size", "32", "--asym",
            "--act-order", "--calib", str(calib), "--n-samples", "24", "--seqlen", "64", "--out", str(out), *extra]


def test_kill_and_resume_is_byte_identical(setup, capsys):
    root, model, calib = setup
    assert main(args(model, calib, root / "reference")) == 0
    work, out = root / "work", root / "resumed"
    kill_after = random.randint(0, 3)  # the block whose record triggers the kill
    proc = subprocess.Popen([sys.executable, "-m", "llmquant", *args(model, calib, out, "--work-dir", str(work))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = work / f"block-{kill_after:05d}.safetensors"
    deadline = time.time() + 600
    while not record.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before block {kill_after} was recorded"
    assert not out.exists()
    assert main(args(model, calib, out, "--work-dir", str(work), "--resume")) == 0
    for name in ("model.safetensors", "config.json", "quantize_config.json"):
        assert (out / name).read_bytes() == (root / "reference" / name).read_bytes(), name
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
