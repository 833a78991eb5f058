"""Wall time and peak RSS of one whole process, the way every benchmark script here reports them."""

from __future__ import annotations

import os
import subprocess
import time


def run_timed(cmd: list[str], stdout, stderr=subprocess.STDOUT, threads: int | None = 2) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `cmd` run with `threads` torch/OpenMP threads (None: as inherited); its
    output goes to the open files `stdout` and `stderr` (default: stderr into stdout). Raises
    CalledProcessError on failure."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, unlike RUSAGE_CHILDREN's running max
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return seconds, usage.ru_maxrss * 1024
