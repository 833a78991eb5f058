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
    # no activations to carry: any record can be redone on its own
    "rtn": ("dir", ["--method", "rtn", "--bits", "4", "--group-size", "32"]),
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


def test_a_damaged_fingerprint_is_one_line(setup, capsys):
    """A truncated fingerprint: the run cannot tell whose work dir it is, so it stops, naming the file."""
    root, model, calib = setup
    work = root / "work-fingerprint"
    assert main(args(model, calib, root / "e-fingerprint", "--work-dir", str(work))) == 0
    target = work / "fingerprint.json"
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    capsys.readouterr()
    code = main(args(model, calib, root / "f-fingerprint", "--work-dir", str(work), "--resume"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("llmquant: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert target.name in lines[0] and "damaged" in lines[0]
    assert not (root / "f-fingerprint").exists()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def flip_last_byte(path: Path) -> None:
    """A bit of tensor data flipped: the file still parses; only the checksum can tell."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {  # (run, file, how, the block the resumed run redoes from)
    "newest record truncated": ("gptq", "block-00005.safetensors", truncate, 5),
    "newest state flipped": ("gptq", "state-00005.safetensors", flip_last_byte, 5),
    "older record flipped": ("gptq", "block-00001.safetensors", flip_last_byte, 0),  # no state 0 kept: from 0
    "rtn record flipped": ("rtn", "block-00002.safetensors", flip_last_byte, 2),  # no state needed
    "float targets state": ("gptq-float-targets", "state-00005.safetensors", truncate, 5),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_record_is_redone_and_the_result_is_byte_identical(case, setup, capsys):
    """Every record and state carries a checksum: a damaged one is named on stderr, the blocks from it on
    (or from the last block whose input activations are kept) are redone, and the output is the same."""
    run, name, damage, redo_from = DAMAGE[case]
    root, model, calib = setup
    tag = case.replace(" ", "-")
    reference, out, work = root / f"ref-{tag}", root / f"out-{tag}", root / f"work-{tag}"
    assert main(args(model, calib, reference, run=run)) == 0
    assert main(args(model, calib, root / f"first-{tag}", "--work-dir", str(work), run=run)) == 0
    records = sorted(p.name for p in work.glob("*.safetensors"))
    damage(work / name)
    capsys.readouterr()
    assert main(args(model, calib, out, "--work-dir", str(work), "--resume", run=run)) == 0
    err = capsys.readouterr().err
    assert name in err and "damaged" in err and f"redoing block {redo_from} and after" in err, err
    assert "Traceback" not in err
    want, got = output_bytes(reference), output_bytes(out)
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)
    assert sorted(p.name for p in work.glob("*.safetensors")) == records  # the work dir is whole again

