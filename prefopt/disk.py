"""A write that fails for want of space or permission, as one line that names the path and the fix.

Libraries report a full disk in their own ways: ``OSError`` with ``ENOSPC`` from Python's files, a
``SafetensorError`` whose text ends in "(os error 28)", and from ``torch.save`` a ``RuntimeError`` that names
neither ("unexpected pos 576 vs 534"). So the errno is looked for in the error, its text and its causes, and
an I/O error with none, raised while the disk has (almost) no space left, is taken for a full disk too.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from prefopt.errors import PrefoptError

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
NOT_PERMITTED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
# Below this many free bytes, a failed write with no errno is put down to a full disk: a write that ran out of
# space leaves the disk full (its partial file still holds the space when this is checked).
LOW_SPACE_BYTES = 1 << 20
_OS_ERROR_TEXT = re.compile(r"os error (\d+)")
_ERRNO_TEXTS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                "Permission denied": errno.EACCES, "Read-only file system": errno.EROFS}


class WriteError(PrefoptError):
    """A write that failed for want of space or permission: the message names the path and the fix."""


@contextmanager
def writing(path: Path, what: str = "", *, elsewhere: str | None = None,
            cleanup: Callable[[], object] | None = None) -> Iterator[None]:
    """Turn a full disk or a refused write under this block into a ``PrefoptError`` naming ``path`` (or the
    file that failed), ``what`` it is ("checkpoint", "metrics"), and the fix; ``elsewhere`` is the setting that
    moves it to another disk (``output.dir``, ``PREFOPT_CACHE``). ``cleanup`` then removes what the failed
    write left, so nothing partial stays behind looking whole. Other errors pass through unchanged."""
    try:
        yield
    except WriteError:  # a write inside this one failed and said so: only the cleanup is left to do
        if cleanup is not None:
            cleanup()
        raise
    except PrefoptError:
        raise
    except Exception as exc:
        error = write_error(exc, Path(path), what, elsewhere)  # before cleanup, which frees the space it checks
        if error is None:
            raise
        if cleanup is not None:
            cleanup()
        raise error from exc


def write_error(exc: BaseException, path: Path, what: str = "", elsewhere: str | None = None) -> WriteError | None:
    """The one-line error for ``exc`` if it is a full disk or a refused write, else None."""
    code = error_code(exc)
    if code is None and isinstance(exc, (OSError, RuntimeError)) and free_bytes(path) < LOW_SPACE_BYTES:
        code = errno.ENOSPC
    if code not in DISK_FULL | NOT_PERMITTED:
        return None
    # the path the caller names (the cache file, not its temporary name), which is what the user knows
    folder = path if path.is_dir() else path.parent
    named = f"{what} {path}" if what else str(path)
    other_disk = f", or set {elsewhere} to another disk" if elsewhere else ""
    if code in DISK_FULL:
        return WriteError(f"{os.strerror(code).lower()} writing {named}: free space on that disk (df -h {folder})"
                            f"{other_disk}, then rerun")
    other_place = f", or set {elsewhere} to a writable place" if elsewhere else ""
    return WriteError(f"{os.strerror(code).lower()} writing {named}: make {folder} writable by this user"
                        f"{other_place}, then rerun")


def error_code(exc: BaseException) -> int | None:
    """The errno behind ``exc``: its own, or one its text or its causes give."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        text = str(exc)
        if match := _OS_ERROR_TEXT.search(text):
            return int(match.group(1))
        for phrase, code in _ERRNO_TEXTS.items():
            if phrase in text:
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def free_bytes(path: Path) -> float:
    """Bytes an unprivileged user may still write on the disk of ``path`` (its nearest existing folder)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return float("inf")
    return stats.f_bavail * stats.f_frsize
