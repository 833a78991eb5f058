"""Errors a user can fix, and the one line the CLI prints for every failure a user can do something about."""

from __future__ import annotations

import errno

# What the machine, not the program, got wrong: a full disk, permissions, a read-only or failing filesystem.
ENVIRONMENT = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
                         errno.ENAMETOOLONG, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOENT, errno.ENOTDIR,
                         errno.EISDIR})


class UserError(Exception):
    """Bad input: a missing path, an unsupported option, data that is too short."""


def one_line(err: BaseException) -> str | None:
    """The line to show for `err`, or None for a bug in llmquant (whose traceback should be seen)."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError) and err.errno in ENVIRONMENT:
        where = " -> ".join(str(name) for name in (err.filename, err.filename2) if name)
        return f"{where}: {err.strerror}" if where else str(err.strerror)
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":  # torch's, on a GPU
        device = "GPU" if type(err).__name__ == "OutOfMemoryError" else "host"
        return (f"out of {device} memory; fewer or shorter calibration samples (--n-samples, --seqlen) hold less, "
                f"and on the host a lower --max-memory moves the calibration activations to disk")
    return None


def require_finite(tensor, where, name: str) -> None:
    """Refuse a float tensor read from `where` (a file) holding NaN or Inf: every result computed from it
    would be wrong, far from where it came from."""
    if tensor.is_floating_point() and not tensor.isfinite().all():
        raise UserError(f"{where}: tensor '{name}' contains NaN or Inf values")
