"""Run `llmquant` commands with one fault injected at a chosen file-system call (a test helper).

    python tests/faults.py [WORKERS] < jobs.json > results.json

Each job is a list of steps run in order: `{"copy": [src, dst]}` and `{"remove": path}` prepare the
folders; `{"argv": [...], "fault": {"mode": M, "at": N} | null, "snapshot": [paths]}` runs the CLI in a
forked child of this process (imports paid once), with a fault at the N-th call llmquant's own code makes
to one of the operations in OPS, then records what each path in `snapshot` holds. Modes:
- `list`: no fault; the result lists every call as [operation, "file:line"];
- `kill`: SIGKILL right before the call, as `kill -9` or a power cut would;
- `interrupt`: KeyboardInterrupt instead of the call, as Ctrl-C would;
- `enospc`: the call fails as a full disk makes it fail.
A call is listed as [operation, where, whether a full disk can fail it]. A step's result: exit code (negative: the signal), the last lines of its output, and the snapshots
({relative path: sha256 of the bytes, with timings dropped from quant_report.json}, hidden entries
beside the path listed under "hidden").

Jobs are shared among WORKERS forked workers (default 1); they must not share folders. The parent never
runs torch code, so each child starts its own thread pool.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import traceback

import gguf
import safetensors
import safetensors.torch  # noqa: F401  (import once here, not in every child)

import llmquant
import llmquant.api  # noqa: F401  (what every command imports, once here)
import llmquant.pipeline  # noqa: F401
import llmquant.resume
import transformers.models.llama.modeling_llama  # noqa: F401
from llmquant.cli import main
from llmquant.formats import atomic

HERE = os.path.dirname(llmquant.__file__)

# (owner, attribute, what a full disk raises there, or None where it cannot fail that way)
OPS = [
    (os, "replace", OSError), (os, "rename", OSError), (os, "unlink", None), (os, "mkdir", OSError),
    (os, "open", OSError), (os, "pwrite", OSError), (os, "posix_fallocate", OSError), (os, "fsync", OSError),
    (shutil, "rmtree", None), (tempfile, "mkdtemp", OSError), (tempfile, "mkstemp", OSError),
    (pathlib.Path, "write_text", OSError), (pathlib.Path, "unlink", None), (pathlib.Path, "chmod", None),
    (pathlib.Path, "mkdir", OSError), (atomic, "_exchange", None),
    (llmquant.resume, "save_file", safetensors.SafetensorError),
    (gguf.GGUFWriter, "write_header_to_file", OSError), (gguf.GGUFWriter, "write_kv_data_to_file", OSError),
    (gguf.GGUFWriter, "write_ti_data_to_file", OSError), (gguf.GGUFWriter, "write_tensor_data", OSError),
    (gguf.GGUFWriter, "close", OSError),
]


def _full_disk(kind):
    if kind is safetensors.SafetensorError:  # what safetensors' Rust writer raises
        return kind('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                    '"No space left on device" })')
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _install(mode: str, at: int | None, calls: list) -> None:
    """Wrap every operation in OPS: count the calls made from llmquant's files, and fault the at-th."""
    for owner, attr, failure in OPS:
        real = getattr(owner, attr)
        label = f"{getattr(owner, '__name__', owner)}.{attr}"

        def wrapper(*args, _real=real, _label=label, _failure=failure, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(HERE):
                calls.append([_label, _where(caller), _failure is not None])
                if len(calls) == at:
                    if mode == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    if mode == "interrupt":
                        raise KeyboardInterrupt
                    if mode == "enospc" and _failure is not None:
                        raise _full_disk(_failure)
            return _real(*args, **kwargs)

        setattr(owner, attr, wrapper)  # on a class, a plain function binds like the method it replaces


def _where(frame) -> str:
    """'file:line < file:line': the call and the call of the function it is in, which tells the same line
    reached for different purposes apart (a record or a state written by one helper)."""
    sites = []
    for f in (frame, frame.f_back):
        if f is not None and f.f_code.co_filename.startswith(HERE):
            sites.append(f"{os.path.relpath(f.f_code.co_filename, HERE)}:{f.f_lineno}")
    return " < ".join(sites)


def _run(argv: list[str], fault: dict | None, log: str) -> tuple[int, list]:
    calls_file = log + ".calls"
    pid = os.fork()
    if pid == 0:  # the child: its output to the log, the CLI with the fault, then out without cleanup
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            calls: list = []
            if fault is not None:
                _install(fault["mode"], fault.get("at"), calls)
            code = main(argv)
            if fault is not None and fault["mode"] == "list":
                with open(calls_file, "w") as f:
                    json.dump(calls, f)
        except BaseException:  # a traceback is a finding: keep it in the log
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    calls = json.load(open(calls_file)) if os.path.exists(calls_file) else []
    return code, calls


def snapshot(path: str) -> dict:
    """What `path` holds (a file or a folder), by relative path and sha256, and the hidden names beside it."""
    p = pathlib.Path(path)
    files = {}
    if p.is_file():
        files["."] = _digest(p)
    elif p.is_dir():
        files = {str(f.relative_to(p)): _digest(f) for f in sorted(p.rglob("*")) if f.is_file()}
    hidden = sorted(f.name for f in p.parent.iterdir() if f.name.startswith(".")) if p.parent.is_dir() else []
    return {"files": files, "hidden": hidden}


def _digest(path: pathlib.Path) -> str:
    data = path.read_bytes()
    if path.name == "quant_report.json":  # everything but the timings
        data = json.dumps(_untimed(json.loads(data)), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def run_job(steps: list[dict], log: str) -> list[dict]:
    results = []
    for step in steps:
        if "copy" in step:
            src, dst = step["copy"]
            shutil.rmtree(dst, ignore_errors=True) if os.path.isdir(dst) else None
            (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, dst)
        elif "remove" in step:
            target = step["remove"]
            shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) else \
                pathlib.Path(target).unlink(missing_ok=True)
        else:
            code, calls = _run(step["argv"], step.get("fault"), log)
            with open(log, errors="replace") as f:
                output = f.read()
            results.append({"code": code, "output": output[-3000:], "calls": calls,
                            "snapshots": {p: snapshot(p) for p in step.get("snapshot", [])}})
    return results


def run_all(jobs: list, workers: int, tmp: str) -> list:
    pids = []
    for k in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                mine = {i: run_job(job, os.path.join(tmp, f"log-{k}")) for i, job in enumerate(jobs) if i % workers == k}
                with open(os.path.join(tmp, f"results-{k}.json"), "w") as f:
                    json.dump(mine, f)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    results = {}
    for k, pid in enumerate(pids):
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"worker {k} failed")
        with open(os.path.join(tmp, f"results-{k}.json")) as f:
            results.update({int(i): r for i, r in json.load(f).items()})
    return [results[i] for i in range(len(jobs))]


if __name__ == "__main__":
    jobs = json.load(sys.stdin)
    with tempfile.TemporaryDirectory() as tmp:
        json.dump(run_all(jobs, int(sys.argv[1]) if len(sys.argv) > 1 else 1, tmp), sys.stdout)
