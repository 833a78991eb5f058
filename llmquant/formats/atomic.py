"""Write a directory (or a single file) so that it either appears complete or not at all, and so that a
replaced output is never lost.

Everything goes into a hidden temporary sibling that replaces `dest` only when complete: a file by one
rename; a directory by one exchange of the two names (Linux `renameat2(RENAME_EXCHANGE)`), after which the
old output, now under the temporary name, is deleted. Where the filesystem cannot exchange, the old output
is first renamed aside (`.llmq-<hash>.replaced`) and the next run on the same output puts it back if the
swap was cut short. Any error or interrupt removes the temporary; a `kill -9` can leave one behind
(`.llmq-<pid>-*.incomplete`), which the next run in that folder removes once its process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import UserError

TEMP_PREFIX = ".llmq-"
RENAME_EXCHANGE = 2  # linux/fs.h


def check_destination(dest: Path, force: bool, directory: bool = True) -> None:
    """Fail now, not after hours of work, if `dest` cannot be written; first repair what an interrupted
    earlier run left beside it."""
    dest = Path(dest)
    if dest.name in ("", ".", "..") or dest.absolute() == Path.cwd():
        raise UserError(f"output {dest} names a folder that holds other things, not a new output; name one")
    parent = dest.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"output {dest}: {parent} is not a directory")
    try:
        longest = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    if len(dest.name.encode()) > longest:
        raise UserError(f"output {dest}: the name is longer than the filesystem allows ({longest} bytes)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output {dest}: no permission to write in {parent}")
    if dest.parent.is_dir():
        recover(dest)
    if dest.exists() and not force:
        raise UserError(f"output {dest} exists; pass --force to replace it")
    if dest.exists() and dest.is_dir() != directory:
        raise UserError(f"output {dest} exists and is {'not ' * directory}a directory")


def _aside(dest: Path) -> Path:
    """Where the fallback swap keeps the old output of `dest` (a short name, whatever the length of dest's)."""
    return dest.parent / f"{TEMP_PREFIX}{hashlib.sha256(dest.name.encode()).hexdigest()[:16]}.replaced"


def recover(dest: Path) -> None:
    """Finish what an interrupted run left beside `dest`: an old output set aside and not replaced is put
    back (one replaced is deleted), and temporaries of processes that no longer run are removed."""
    old = _aside(dest)
    if old.exists():
        if dest.exists():
            _remove(old)
        else:
            os.replace(old, dest)
            print(f"llmquant: restored {dest}, which an interrupted run had set aside", file=sys.stderr)
    for stale in dest.parent.glob(f"{TEMP_PREFIX}*.incomplete"):
        pid = stale.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _temporary_sibling(dest: Path, directory: bool) -> Path:
    """A hidden, uniquely named file or directory beside `dest` (the parents made as needed), named after
    this process so that a later run can tell a dead run's leftovers from a live one's."""
    prefix, suffix = f"{TEMP_PREFIX}{os.getpid()}-", ".incomplete"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=dest.parent))
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dest.parent)
        os.close(fd)
        return Path(name)
    except OSError as err:
        raise UserError(f"writing {dest} failed: {err.strerror or err}") from None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two names in one step; False where the system or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_directory(tmp: Path, dest: Path) -> None:
    """Put the complete `tmp` at `dest`; at every instant `dest` holds the old output or the new one (or,
    in the fallback, the old one lies aside where `recover` finds it)."""
    if not dest.exists():
        os.replace(tmp, dest)
    elif _exchange(tmp, dest):
        _remove(tmp)  # now the old output
    else:
        old = _aside(dest)
        _remove(old)
        os.replace(dest, old)
        os.replace(tmp, dest)
        _remove(old)


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
        _replace_directory(tmp, dest)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        recover(dest)
        _raise_as_write_error(err, dest, tmp)
        raise


@contextlib.contextmanager
def scratch_directory(beside: Path):
    """A hidden folder beside `beside` for the run's scratch files, removed at the end (or, after a
    `kill -9`, by the next run in that folder)."""
    tmp = _temporary_sibling(Path(beside), directory=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        _raise_as_write_error(err, dest, tmp)
        raise


def _raise_as_write_error(err: BaseException, dest: Path, tmp: Path) -> None:
    """An OSError of the output's own writes says so, naming `dest`; any other (reading the model, say)
    goes on as it is, naming its own file."""
    if isinstance(err, OSError) and (err.filename is None or str(err.filename).startswith(str(tmp))
                                     or str(err.filename).startswith(str(dest))):
        raise UserError(f"writing {dest} failed: {err.strerror or err}") from None
