"""One fault at every file-system call of the output and work-dir code, the activations memory-mapped in
the work dir included (tests/faults.py): a `kill -9`, a Ctrl-C, or a full disk. After any of them `--out`
holds the complete old output or the complete new one, a Ctrl-C or a full disk leaves no temporaries and
ends in one line, and `--resume` then writes bytes identical to an uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import sample_text

DRIVER = Path(__file__).with_name("faults.py")
RENAMES = {"os.replace", "os.rename", "llmquant.formats.atomic._exchange", "shutil.rmtree", "Path.unlink",
           "os.unlink"}  # where a Ctrl-C between two steps of a swap matters

SCENARIOS = {  # the new run, the old output it replaces, what it writes
    "safetensors": (["--method", "gptq", "--bits", "4", "--group-size", "32"],
                    ["--method", "rtn", "--bits", "8", "--group-size", "32"], "out"),
    "gguf": (["--method", "gptq", "--format", "gguf", "--gguf-type", "Q4_0"],
             ["--method", "rtn", "--format", "gguf", "--gguf-type", "Q8_0"], "out.gguf"),
}


def one_block_budget(model) -> str:
    """--max-memory that holds one block of `model` and a little more, so the activations are mapped."""
    from llmquant.config import QuantConfig
    from llmquant.models.checkpoint import Checkpoint
    from llmquant.pipeline import memory_budget

    return f"{memory_budget(QuantConfig(method='gptq', max_memory='1TB'), Checkpoint(model), True).block + 1024}B"


def drive(jobs: list) -> list:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(DRIVER), "2"], input=json.dumps(jobs), capture_output=True,
                          text=True, env=env, cwd=DRIVER.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_one_fault_anywhere_keeps_old_or_new_and_resume_is_byte_identical(scenario, tiny_model_dir, tmp_path):
    new_flags, old_flags, name = SCENARIOS[scenario]
    if scenario == "safetensors":  # room for one block, not for the activations: they are mapped in the work dir
        new_flags = [*new_flags, "--max-memory", one_block_budget(tiny_model_dir)]
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(4000, seed=3))

    def quantize(flags, out, *extra):
        return ["quantize", str(tiny_model_dir), *flags, "--calib", str(calib), "--n-samples", "8", "--seqlen", "32",
                "--out", str(out), *extra]

    def new_run(folder, *extra):
        return quantize(new_flags, folder / name, "--force", "--work-dir", str(folder / "work"), *extra)

    def job(folder, fault):
        return [{"copy": [str(tmp_path / "old" / name), str(folder / name)]}, {"remove": str(folder / "work")},
                {"argv": new_run(folder), "fault": fault, "snapshot": [str(folder / name)]},
                {"argv": new_run(folder, "--resume"), "snapshot": [str(folder / name)]}]

    for folder in ("old", "new", "listed"):
        (tmp_path / folder).mkdir()
    setup = drive([[{"argv": quantize(old_flags, tmp_path / "old" / name), "snapshot": [str(tmp_path / "old" / name)]}],
                   [{"argv": quantize(new_flags, tmp_path / "new" / name), "snapshot": [str(tmp_path / "new" / name)]}]])
    old = setup[0][0]["snapshots"][str(tmp_path / "old" / name)]["files"]
    new = setup[1][0]["snapshots"][str(tmp_path / "new" / name)]["files"]
    listed = drive([job(tmp_path / "listed", {"mode": "list"})])[0][0]
    assert listed["code"] == 0 and listed["snapshots"][str(tmp_path / "listed" / name)]["files"] == new, listed["output"]
    assert ("memory-mapped" in listed["output"]) == (scenario == "safetensors"), listed["output"]

    first = {}  # each distinct call site, at its first call
    for at, (label, where, can_fail) in enumerate(listed["calls"], start=1):
        first.setdefault((label, where), (at, can_fail))
    if scenario == "gguf":  # the work-dir calls are the same as for safetensors: only the output's own
        first = {site: v for site, v in first.items() if not site[1].startswith("resume.py")}
    faults = [(mode, site, at) for site, (at, can_fail) in first.items()
              for mode in ("kill", "interrupt", "enospc")
              if mode == "kill" or (mode == "enospc" and can_fail) or (mode == "interrupt" and site[0] in RENAMES)]
    assert len(faults) >= {"safetensors": 45, "gguf": 20}[scenario], faults
    jobs = []
    for k, (mode, site, at) in enumerate(faults):
        (tmp_path / f"f{k}").mkdir()
        jobs.append(job(tmp_path / f"f{k}", {"mode": mode, "at": at}))

    problems = []
    for k, ((mode, site, at), (faulted, resumed)) in enumerate(zip(faults, drive(jobs))):
        out = str(tmp_path / f"f{k}" / name)
        after, final = faulted["snapshots"][out], resumed["snapshots"][out]
        errors = [line for line in faulted["output"].splitlines() if line.startswith("llmquant: error:")]
        what = f"{mode} at {site[0]} ({site[1]})"
        expected = {"kill": -9, "interrupt": 130, "enospc": 2}[mode]
        if faulted["code"] != expected or "Traceback" in faulted["output"]:
            problems.append(f"{what}: exit {faulted['code']}, not {expected}: {faulted['output'][-600:]}")
        if after["files"] not in ([old] if mode == "enospc" else [old, new]):
            problems.append(f"{what}: --out holds neither the old nor the new output: {sorted(after['files'])}")
        if mode != "kill" and after["hidden"]:
            problems.append(f"{what}: left {after['hidden']}")
        if mode == "enospc" and (len(errors) != 1 or "No space left on device" not in errors[0]):
            problems.append(f"{what}: not one line naming the full disk: {faulted['output'][-600:]}")
        if resumed["code"] != 0 or final["files"] != new or final["hidden"]:
            problems.append(f"{what}: --resume gave exit {resumed['code']}, "
                            f"{'the new output' if final['files'] == new else 'other bytes'}, "
                            f"left {final['hidden']}: {resumed['output'][-600:]}")
        partial = sorted(p.name for p in (tmp_path / f"f{k}" / "work").glob("*.partial"))
        if partial:
            problems.append(f"{what}: the resumed run left {partial} in the work dir")
    assert not problems, "\n".join(problems)
