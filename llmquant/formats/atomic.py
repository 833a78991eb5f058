"""Write a directory so that it either appears complete or not at all.

Everything goes into a hidden temporary sibling that is renamed into place at the end; any error
or interrupt (Ctrl-C, disk full) removes it. A `kill -9` can leave the hidden temporary behind,
never a directory at the destination that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError


def check_destination(dest: Path, force: bool) -> None:
    if dest.exists() and not force:
        raise UserError(f"output {dest} exists; pass --force to replace it")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"output {dest} exists and is not a directory")


def _finish_tree(root: Path) -> None:
    """Flush everything to disk and give it the usual permissions (mkdtemp and safetensors use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [*root.rglob("*"), root]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(dest: Path, force: bool = False):
    """Yield a temporary directory; on success it replaces `dest`."""
    dest = Path(dest)
    check_destination(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".incomplete", dir=dest.parent))
    try:
        yield tmp
        _finish_tree(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.replaced")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"writing {dest} failed: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
