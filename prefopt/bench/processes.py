"""A child process with its own wall time and peak memory.

Each run trains in a fresh process, so its peak resident memory is its own: ``os.wait4`` returns the
resource usage of exactly that child (``getrusage(RUSAGE_CHILDREN)`` would give the largest of all
children so far, which hides an entry that needs less than an earlier one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    wall_s: float
    peak_rss_mib: float  # the child's maximum resident set size

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def python_module(module: str, *args: str) -> list[str]:
    """``python -m module args``, with this interpreter (the same virtual environment)."""
    return [sys.executable, "-m", module, *args]


def run_child(command: list[str], log_path: Path) -> ChildResult:
    """Run ``command`` with stdout and stderr appended to ``log_path``; wait for it and measure it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log shows progress as it happens
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        # A bench stopped with SIGTERM must not leave its child training behind: turn the signal into an
        # exception (signal handlers can only be set in the main thread).
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except KeyboardInterrupt:
            # Ctrl-C reached the child too (same process group): let it stop cleanly before we do.
            process.wait()
            raise
        except BaseException:
            process.terminate()
            process.wait()
            raise
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss_bytes = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return ChildResult(process.returncode, wall, rss_bytes / 2**20)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def failure_reason(result: ChildResult, log_path: Path) -> str:
    """Why a child failed, in a few words: the signal that killed it, or its own error line."""
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        return f"killed by {name}" + (", out of memory?" if name == "SIGKILL" else "")
    return f"exit {result.returncode}: {last_error_line(log_path)}"


def last_error_line(log_path: Path) -> str:
    """The child's own one-line error (``prefopt: error: ...``), else the last line of its log."""
    try:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("prefopt: error: ")]
    if errors:
        return errors[-1].removeprefix("prefopt: error: ")
    return lines[-1].strip() if lines else "no output"
