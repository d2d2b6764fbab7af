"""Writing folders and files atomically: a crash mid-write never leaves one that looks whole.

A folder is written into a hidden sibling ``.<name>.partial-<pid>-<random>``, flushed to disk,
then renamed to ``<name>``; an older folder of the same name is moved aside
(``.<name>.old-<pid>-<random>``) and deleted only once the new one is in place. A file is
written to a hidden sibling and renamed over the old one (one atomic rename). What a killed
process left behind is tidied by the next write of the same name. Everything created gets the
usual permissions (0777/0666 less the umask), not the private 0700 of temporary folders.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from config.errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

_PARTIAL = "partial"
_OLD = "old"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: Path, error: BaseException, what: str) -> UserError:
    """The user's message for an OS error while writing ``path`` (a full disk, no permission)."""
    if isinstance(error, OSError) and error.strerror is not None:
        where = f" ({error.filename})" if error.filename is not None else ""
        reason = f"{error.strerror}{where}"
    else:
        reason = str(error)
    return UserError(
        f"cannot write the {what} {path}: {reason}. Check that the folder is writable and the "
        f"disk has room (save_ckpt_dir / logdir); any earlier {what} there is unchanged"
    )


def prepare_parent(path: Path, what: str) -> None:
    """Create the parent folder of ``path``; a file in the way is a `UserError`."""
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot write the {what} {path}: {existing} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(path, error, what) from error


def _sibling_prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{os.getpid()}-"


def recover_leftovers(path: Path) -> None:
    """Tidy what a process killed while writing ``path`` left beside it.

    A partial folder or file is deleted. An old folder moved aside is put back when nothing is
    at ``path`` (the process died between the two renames) and deleted otherwise. What a process
    that is still running left is not touched.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.({_PARTIAL}|{_OLD})-(\d+)-[^/]*")
    for sibling in sorted(path.parent.iterdir()):
        match = pattern.fullmatch(sibling.name)
        if match is None or _process_alive(int(match.group(2))):
            continue
        if match.group(1) == _OLD and sibling.is_dir() and not path.exists():
            logger.warning("restoring the previous %s from %s", path, sibling)
            sibling.rename(path)
        elif sibling.is_dir():
            logger.warning("removing %s, left by an interrupted save", sibling)
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():  # a previous process with the same id (e.g. pid 1 in a container)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_folder(path: Path, what: str) -> Iterator[Path]:
    """Yield an empty temporary folder; when the block ends, it becomes ``path``.

    An existing folder at ``path`` is replaced only once the new one is complete. On any error
    the temporary folder is removed (an OS error becomes a `UserError` naming ``path``).
    The caller decides beforehand whether ``path`` may be replaced.
    """
    prepare_parent(path, what)
    recover_leftovers(path)
    try:
        temp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(path, _PARTIAL), dir=path.parent))
        temp.chmod(0o777 & ~_umask())
    except OSError as error:
        raise write_error(path, error, what) from error
    try:
        yield temp
        sync_tree(temp)
        _move_into_place(temp, path)
    except BaseException as error:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(error, OSError):
            raise write_error(path, error, what) from error
        raise


def atomic_file(path: Path, write: Callable[[Path], None], what: str) -> Path:
    """Call ``write(temporary path)``, flush it and rename it to ``path`` (replacing any file)."""
    prepare_parent(path, what)
    recover_leftovers(path)
    temp = path.with_name(f"{_sibling_prefix(path, _PARTIAL)}{secrets.token_hex(4)}")
    try:
        write(temp)
        temp.chmod(0o666 & ~_umask())
        _fsync(temp)
        os.replace(temp, path)
        _fsync(path.parent)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise write_error(path, error, what) from error
        raise
    return path


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock over ``folder`` among the processes of this machine.

    Taken while a name is chosen and claimed and while a folder is moved into place, so that
    two runs writing into one folder never both take a name that looked free. It is
    ``fcntl.flock`` on the folder itself (nothing is written); where there is no ``fcntl``, as
    on Windows, there is no lock.
    """
    if fcntl is None:
        yield
        return
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError as error:
        raise write_error(folder, error, "folder") from error
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def _move_into_place(temp: Path, path: Path) -> None:
    """Rename ``temp`` to ``path``; an older folder there is deleted only afterwards.

    While it is moved aside, the older folder has an ``.old-`` name that `recover_leftovers`
    puts back if the process dies before the new one is in place. The two renames happen under
    the folder's lock, so another run never sees the name free in between.
    """
    old = None
    with folder_lock(path.parent):
        if path.exists():
            old = path.with_name(f"{_sibling_prefix(path, _OLD)}{secrets.token_hex(4)}")
            path.rename(old)
        temp.rename(path)
    _fsync(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``, so a rename never exposes empty files."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
