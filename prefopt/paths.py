"""Where prefopt keeps what it builds once and reuses (converted models, task data, reference caches), how a
file or directory is put in place so that a reader sees either nothing (or the old one) or a complete one, and
how what a writer that died left behind is recognised and removed."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from prefopt.disk import writing

CACHE_ENV = "PREFOPT_CACHE"


def cache_root() -> Path:
    """``$PREFOPT_CACHE``, else ``$XDG_CACHE_HOME/prefopt``, else ``~/.cache/prefopt``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "prefopt"


def cache_dir(*parts: str) -> Path:
    """A sub-directory of the cache root, created on first use."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def staging_dir(target: Path, purpose: str) -> Path:
    """A fresh private directory beside ``target`` to build it in, before ``publish`` moves it into place.

    Its name carries the builder's pid, so staging directories of builders that died (even by SIGKILL)
    are recognised and removed here. ``mkdir`` rather than ``mkdtemp``: the cache may be shared, and
    ``mkdtemp`` makes owner-only directories.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.{purpose}-"
    for stale in target.parent.glob(prefix + "*"):
        pid = stale.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = target.parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def publish(staging: Path, target: Path, is_complete: Callable[[Path], bool]) -> None:
    """Rename ``staging`` to ``target`` in one step; if another process published first, keep theirs."""
    try:
        os.replace(staging, target)  # atomic; also replaces an empty directory left at target
    except OSError:
        if not is_complete(target):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a no-op once the rename succeeded


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller to write; on a clean exit it is flushed to disk and
    renamed over ``path`` in one step, on an exception it is removed and ``path`` is left as it was.

    Every atomic write goes through here, so what happens to a finished file before it becomes visible is
    decided in one place. The name carries the pid: processes writing the same target never share a
    temporary file. The parent directory is created when missing.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # A full disk or a refused write ends in one line naming the file; the partial temporary file is gone.
    with writing(path, elsewhere=CACHE_ENV if path_is_under(path, cache_root()) else None):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            _fsync_file(tmp)
            os.replace(tmp, path)  # atomic: readers see the old file or the complete new one
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)  # make the rename itself durable


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON ending in a newline."""
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")


def replace_dir(staging: Path, target: Path) -> None:
    """Move the finished directory ``staging`` to ``target``, replacing whatever ``target`` holds.

    A non-empty directory cannot be renamed over, so the old one is moved aside first and put back if the
    second rename fails: ``target`` is always either the old directory or the complete new one.
    """
    fsync_dir(staging)
    if target.is_dir() and any(target.iterdir()):
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)  # atomic; also replaces an empty directory left at target
    fsync_dir(target.parent)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename into it) durable; a no-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def path_is_under(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (possibly one that reused a dead writer's pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


# --- what writers that died left behind

# The temporary names prefopt writes. One process's carry its pid: ``.<name>.<pid>.tmp`` (``atomic_file``, a
# checkpoint being written) and ``.<name>.<purpose>-<pid>-<8 hex>`` (``staging_dir``; ``replace_dir``'s old
# copy, purpose ``old``). Two have no owner: ``.step-<N>.tmp`` (every process of a run writes into it at once)
# and ``.model.tmp`` (the run's main process); only those are matched, since a run folder may hold others'
# files.
_TEMP_WITH_PID = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
_STAGED = re.compile(r"^\.(?P<name>.+)\.(?P<purpose>[a-z]+)-(?P<pid>\d+)-[0-9a-f]{8}$")
_TEMP_WITHOUT_PID = re.compile(r"^\.(step-\d+|model)\.tmp$")


def remove_stale_temps(folder: Path, *, unowned_too: bool = False) -> list[Path]:
    """Remove the temporary files and folders in ``folder`` whose writer no longer runs; returns them.

    ``unowned_too`` also removes those named with no pid, which only the holder of the folder's lock knows
    to be dead (``prefopt.locks``). An old copy that ``replace_dir`` set aside is put back instead when its
    writer died before the new one took its place: it is then the only complete copy.
    """
    if not Path(folder).is_dir():
        return []
    removed = []
    for path in sorted(Path(folder).iterdir()):
        pid = _temp_writer(path.name)
        if pid is None or (pid == -1 and not unowned_too) or (pid != -1 and pid_alive(pid)):
            continue
        staged = _STAGED.match(path.name)
        original = path.with_name(staged.group("name")) if staged and staged.group("purpose") == "old" else None
        if original is not None and not original.exists():
            os.replace(path, original)  # the writer died between replace_dir's two renames
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _temp_writer(name: str) -> int | None:
    """The pid in a temporary name, -1 for one without a pid, None for a name that is not temporary."""
    match = _TEMP_WITH_PID.match(name) or _STAGED.match(name)
    if match:
        return int(match.group("pid"))
    return -1 if _TEMP_WITHOUT_PID.match(name) else None
