"""One writer at a time: a lock on a run's ``output.dir`` for the whole run, and on a cache entry while it
is built.

A lock is a file (``<output.dir>/.prefopt.lock``, ``<cache entry>.lock``) holding its holder's pid, host and
process start time, under an ``flock``. The flock is what excludes: the kernel drops it when the holder
exits however it exits (SIGKILL included), so no lock stays held by a dead process. The file's text is what
a refused process reports; when the flock is free but the file still names a holder, that holder died
without releasing it, and the lock is taken over with a note. Where a file system ignores flock, a live
holder on this host named by the file still refuses (the start time tells a reused pid from its holder).

A run refuses a second writer on its ``output.dir`` at once; a second builder of a cache entry waits for
the first and then finds its result.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from prefopt.errors import PrefoptError
from prefopt.paths import pid_alive, remove_stale_temps

RUN_LOCK_NAME = ".prefopt.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its lock file says."""

    pid: int
    host: str
    started: str | None = None  # the process's start time where /proc shows it: a reused pid is not its holder

    @classmethod
    def me(cls) -> "Holder":
        return cls(os.getpid(), socket.gethostname(), process_start_time(os.getpid()))

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        try:
            fields = json.loads(text)
            return cls(int(fields["pid"]), str(fields["host"]), fields.get("started"))
        except (ValueError, KeyError, TypeError):
            return None  # empty (its writer died before writing) or not ours

    def alive(self) -> bool | None:
        """Whether the holder still runs; None for a holder on another host, which cannot be asked."""
        if self.host != socket.gethostname():
            return None
        if not pid_alive(self.pid):
            return False
        return self.started is None or process_start_time(self.pid) in (None, self.started)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}"


class FileLock:
    """An exclusive lock on ``path`` for this process (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._owner: int | None = None

    def acquire(self, wait: bool) -> tuple[bool, Holder | None]:
        """Take the lock, waiting for it if ``wait``. Returns (True, a dead holder it took over, or None) when
        taken, and (False, the holder, if known) when another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False, Holder.parse(_read_text(self.path))
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed the file as we opened it: lock the one there now
        previous = Holder.parse(os.pread(fd, 4096, 0).decode(errors="replace"))
        if previous is not None and previous.pid != os.getpid() and previous.alive():
            os.close(fd)  # the file system ignores flock, and its holder runs: it still holds the lock
            return False, previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(vars(Holder.me())).encode(), 0)
        os.fsync(fd)
        self._fd, self._owner = fd, os.getpid()
        return True, previous

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed first, while still held, so no one locks it again)."""
        if self._fd is None or self._owner != os.getpid():  # a forked child at exit: the lock is its parent's
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


# --- a run's output.dir

_held_run_dirs: dict[Path, FileLock] = {}


def claim_run_dir(run_dir: Path, say: Callable[[str], None], *, main_process: bool = True) -> None:
    """Take ``run_dir`` for this run, or refuse in one line naming the process that has it; then remove what
    writers that died left there (temporary files and folders), which only the lock's holder may do.
    A no-op on a process other than the main one: the main process writes for all of them."""
    if not main_process:
        return
    run_dir = Path(run_dir)
    lock_run_dir(run_dir, say)
    for leftover in remove_stale_temps(run_dir, unowned_too=True) + remove_stale_temps(run_dir / "checkpoints",
                                                                                         unowned_too=True):
        say(f"note: removed {leftover}, left by a write that did not finish")


def lock_run_dir(run_dir: Path, say: Callable[[str], None]) -> None:
    """Lock ``run_dir`` until ``release_run_dir`` or this process's exit; a run in this process that already
    holds it (a rerun after an error, an algorithm's next phase) keeps it."""
    key = Path(run_dir).resolve()
    if key in _held_run_dirs:
        return
    lock = FileLock(run_dir / RUN_LOCK_NAME)
    taken, holder = lock.acquire(wait=False)
    if not taken:
        who = holder.describe() if holder is not None else "another process"
        raise PrefoptError(
            f"output.dir {run_dir} is in use by {who} (lock file {lock.path}); wait for that run to end or stop it, "
            "or choose another output.dir"
        )
    if holder is not None and holder.pid != os.getpid():
        say(f"note: output.dir {run_dir} was locked by {holder.describe()}, which is no longer running; "
            "taking the lock over")
    _held_run_dirs[key] = lock


def release_run_dir(run_dir: Path) -> None:
    """Let another process write ``run_dir``; a no-op when this process does not hold it."""
    lock = _held_run_dirs.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.release()


def release_all() -> None:
    """Every run directory this process still holds (at exit: a run that stopped on an error)."""
    for key in list(_held_run_dirs):
        _held_run_dirs.pop(key).release()


atexit.register(release_all)  # the kernel drops the flocks at exit anyway; this also removes the files


# --- a cache entry while it is built


@contextmanager
def build_lock(target: Path, say: Callable[[str], None] = lambda line: None) -> Iterator[None]:
    """Hold ``<target>.lock`` while checking for, building or repairing the cache entry ``target``; a second
    builder waits here (saying for whom) and then finds the first one's result."""
    lock = FileLock(Path(target).with_name(Path(target).name + ".lock"))
    taken, holder = lock.acquire(wait=False)
    if not taken:
        who = holder.describe() if holder is not None else "another process"
        say(f"waiting for {who}, which is building {target}")
        taken, _ = lock.acquire(wait=True)
        if not taken:  # only where flock is ignored and the file names a live holder
            raise PrefoptError(f"{lock.path} is held by {who}; wait for it to finish, or delete the file if that "
                               "process is gone")
    try:
        yield
    finally:
        lock.release()


# --- processes


def process_start_time(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (Linux /proc), or None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces; the start time is field 22.
    return stat.rpartition(")")[2].split()[19]


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
