"""`eval --tasks`: lm-evaluation-harness accuracy on models llmquant loads, checked against lm-eval's own CLI on
the same model, with a local multiple-choice task (the Hub is unreachable here)."""

import json
import os
import subprocess
import sys

import pytest

from llmquant.cli import main

pytest.importorskip("lm_eval", reason="lm-eval is in the test extra: pip install -e '.[test]'")

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TASK = "llmquant_sums"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice task of 40 small sums, its data a local jsonl named by absolute path."""
    folder = tmp_path_factory.mktemp("tasks")
    rows = []
    for i in range(40):
        a, b = 3 + i % 7, 2 + (5 * i) % 9
        choices = [str(a + b + d) for d in (-2, 1, 0, 3)]
        rows.append({"question": f"What is {a} plus {b}?", "choices": choices, "answer": 2})
    (folder / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'sums.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
        "  - metric: acc_norm\nmetadata:\n  version: 1.0\n")
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


def ours(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.demo
def test_accuracy_matches_lm_eval_cli_on_the_float_demo(demo_model_dir, task_dir, tmp_path, capsys):
    result = ours(capsys, demo_model_dir, "--tasks", TASK, "--tasks-path", task_dir)["tasks"]["results"][TASK]
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                    f"pretrained={demo_model_dir},dtype=float32", "--tasks", TASK, "--include_path", str(task_dir),
                    "--device", "cpu", "--batch_size", "1", "--output_path", str(out)],
                   check=True, capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=600)
    cli = json.loads(next(out.rglob("results_*.json")).read_text())["results"][TASK]
    assert result["metric"] == "acc_norm"
    assert result["all"]["acc"] == cli["acc,none"] and result["all"]["acc_norm"] == cli["acc_norm,none"]
    assert result["stderr"] == pytest.approx(cli["acc_norm_stderr,none"])


def test_packed_model_reports_retention_and_records_it_in_its_card(tiny_model_dir, task_dir, tmp_path, capsys,
                                                                    calib):
    packed = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--method", "rtn", "--bits", "2", "--group-size", "32",
                 "--out", str(packed)]) == 0
    capsys.readouterr()
    result = ours(capsys, packed, "--base", tiny_model_dir, "--tasks", TASK, "--tasks-path", task_dir,
                  "--data", calib, "--seqlen", 64, "--windows", 2, "--card")
    task = result["tasks"]["results"][TASK]
    base = ours(capsys, tiny_model_dir, "--tasks", TASK, "--tasks-path", task_dir)["tasks"]["results"][TASK]
    assert task["base"] == base["value"] and task["retention"] == pytest.approx(task["value"] / base["value"])
    card = (packed / "README.md").read_text()
    assert "## Task accuracy" in card and f"| {TASK} | acc_norm | {base['value']:.4f} |" in card
    assert "## Quality" in card and f"{result['kld']:.5f}" in card and f"{result['ppl']:.4f}" in card


def test_task_mistakes_are_one_line_before_any_model_loads(tiny_model_dir, task_dir, tmp_path, capsys):
    cases = [(["--tasks", "no_such_task", "--tasks-path", task_dir], "unknown task 'no_such_task'"),
             (["--tasks", ","], "--tasks names no task"),
             (["--tasks", TASK, "--tasks-path", tmp_path / "missing"], "is not a folder of task definitions"),
             (["--tasks", TASK, "--tasks-path", task_dir, "--card"], "packed folder or GGUF file")]
    for argv, needle in cases:
        assert main(["eval", str(tiny_model_dir), *map(str, argv)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
