"""Task accuracy with EleutherAI's lm-evaluation-harness, run through its Python API on a model llmquant has
loaded (packed, GGUF or float), and retention against a base model scored the same way.

lm-eval is an optional dependency (`pip install 'llmquant[eval]'`). Its tasks fetch their data from the Hub;
offline, a task needs local data: a folder of task definitions (`tasks_path`, lm-eval's include_path) whose
YAML names local files (`dataset_path: json`, `dataset_kwargs: {data_files: ...}`).
"""

from __future__ import annotations

import logging

from .errors import UserError

# the score a task is judged by, in order of preference: length-normalized accuracy where the task has it
# (hellaswag, arc), as its authors report
METRICS = ("acc_norm", "acc", "exact_match", "f1", "mcc")


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("--tasks runs EleutherAI's lm-evaluation-harness, which is not installed: "
                        "pip install 'llmquant[eval]'") from None
    return lm_eval


def task_manager(tasks: list[str], tasks_path: str | None = None):
    """lm-eval's task index with `tasks_path` added; an unknown task name is one line naming it."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if tasks_path is not None:
        from pathlib import Path

        if not Path(tasks_path).is_dir():
            raise UserError(f"--tasks-path {tasks_path} is not a folder of task definitions")
    manager = TaskManager(include_path=tasks_path, verbosity="ERROR")
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task '{unknown[0]}' (lm-eval knows {len(manager.all_tasks)} tasks and groups; "
                        f"`lm_eval ls tasks` lists them, --tasks-path adds your own)")
    return manager


def run_tasks(model, tokenizer, tasks: list[str], manager, limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 1) -> dict:
    """{"results": {task: {"metric", "value", "stderr", "all"}}, ...}: each task's main score and every
    accuracy-like score it reported."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=False, verbosity="ERROR")
    results = {}
    for task, scores in out["results"].items():
        found = {k.split(",")[0]: v for k, v in scores.items() if k.split(",")[0] in METRICS and isinstance(v, float)}
        if not found:
            continue
        metric = next(m for m in METRICS if m in found)
        stderr = scores.get(f"{metric}_stderr,none")
        results[task] = {"metric": metric, "value": found[metric],
                         "stderr": stderr if isinstance(stderr, float) else float("nan"), "all": found}
    return {"results": results, "lm_eval_version": getattr(lm_eval, "__version__", None), "limit": limit,
            "num_fewshot": num_fewshot}


def with_retention(scored: dict, base: dict | None) -> dict:
    """`scored` with each task's base score and retention (this model's score / the base's)."""
    if base is None:
        return scored
    for task, r in scored["results"].items():
        b = base["results"].get(task)
        r["base"] = b["value"] if b else None
        r["retention"] = r["value"] / b["value"] if b and b["value"] else None
    return scored
