"""Write a directory (or a single file) so that it either appears complete or not at all.

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


def check_destination(dest: Path, force: bool, directory: bool = True) -> None:
    """Fail now, not after hours of work, if `dest` cannot be written."""
    if dest.exists() and not force:
        raise UserError(f"output {dest} exists; pass --force to replace it")
    if dest.exists() and dest.is_dir() != directory:
        raise UserError(f"output {dest} exists and is {'not ' * directory}a directory")
    parent = dest.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"output {dest}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output {dest}: no permission to write in {parent}")


def _temporary_sibling(dest: Path, directory: bool) -> Path:
    """A hidden, uniquely named file or directory beside `dest` (the parents made as needed)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".incomplete", dir=dest.parent))
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".incomplete", dir=dest.parent)
        os.close(fd)
        return Path(name)
    except OSError as err:
        raise UserError(f"writing {dest} failed: {err.strerror or err}") from None


def _finish(paths: list[Path]) -> None:
    """Flush to disk and give the usual permissions (mkstemp, mkdtemp and safetensors use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
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
    tmp = _temporary_sibling(dest, directory=True)
    try:
        yield tmp
        _finish([*tmp.rglob("*"), tmp])
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


@contextlib.contextmanager
def atomic_file(dest: Path, force: bool = False):
    """Yield a temporary file path beside `dest`; on success it is flushed and renamed onto `dest`."""
    dest = Path(dest)
    check_destination(dest, force, directory=False)
    tmp = _temporary_sibling(dest, directory=False)
    try:
        yield tmp
        _finish([tmp])
        os.replace(tmp, dest)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"writing {dest} failed: {err.strerror or err}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
