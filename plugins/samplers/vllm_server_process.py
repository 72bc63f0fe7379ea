"""A ``vllm serve`` started by the training run, which never outlives it.

The run does not start the server itself: it starts this module as a watchdog (``python -m
prefopt_plugins.samplers.vllm_server_process -- vllm serve ...``), in a session of its own, with a pipe on its
standard input. The watchdog starts the server in a process group of its own and waits. When the pipe closes
it stops the server's whole group (SIGTERM, then SIGKILL after a grace period): vLLM's API server and the
engine and worker processes it started share that group. The pipe closes when the run calls ``stop()``, when
the interpreter exits (``atexit``), and also when the run is killed by a signal (SIGTERM, SIGKILL, a crash):
the kernel closes a dead process's files, which no handler inside the run could do for SIGKILL.

Server output (both streams) goes to a log file, named in every error about the server.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from prefopt.errors import PrefoptError

STOP_GRACE_S = 20.0  # how long vLLM may take to shut its engine down on SIGTERM before it is killed


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ServerProcess:
    """``command`` (a ``vllm serve`` command line) run under the watchdog, its output in ``log_path``."""

    def __init__(self, command: Sequence[str], env: dict[str, str], log_path: Path, url: str) -> None:
        self.command, self.log_path, self.url = list(command), Path(log_path), url
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-m", __name__, "--", *self.command], stdin=subprocess.PIPE, stdout=log,
                stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        atexit.register(self.stop)

    def exit_status(self) -> Optional[int]:
        """The server's exit status once it has ended (the watchdog exits with it), else None."""
        return self.watchdog.poll()

    def describe_exit(self) -> Optional[str]:
        """How the server ended, with the last line of its log; None while it runs."""
        status = self.exit_status()
        if status is None:
            return None
        # the watchdog exits with the server's status, 128 + N for a server killed by signal N
        signum = -status if status < 0 else status - 128 if status > 128 else 0
        if signum:  # killed: its log ends wherever it was, which says nothing about why
            return f"it was killed by signal {signum}; its log: {self.log_path}"
        last = last_log_line(self.log_path)  # a server that gives up prints why last
        return f"it exited with status {status}" + (f" ({last})" if last else "") + f"; its log: {self.log_path}"

    def wait_until_healthy(self, healthy: Callable[[], bool], timeout_s: float) -> None:
        """Return once ``healthy()`` is true; a one-line error if the server exits or takes too long."""
        deadline = time.monotonic() + timeout_s
        while not healthy():
            if self.exit_status() is not None:
                self.stop()
                raise PrefoptError(f"sampler vllm_server: the vLLM server launched for {self.url} stopped while "
                                   f"starting: {self.describe_exit()}")
            if time.monotonic() > deadline:
                self.stop()
                raise PrefoptError(
                    f"sampler vllm_server: the vLLM server launched for {self.url} was not healthy after "
                    f"{timeout_s:g} s (stopped); raise algorithm.sampler.launch.startup_timeout_s or read its log: "
                    f"{self.log_path}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the server and its watchdog; safe to call again, and from ``atexit``."""
        atexit.unregister(self.stop)
        if self.watchdog.stdin is not None and not self.watchdog.stdin.closed:
            try:
                self.watchdog.stdin.close()  # the watchdog's signal to stop the server
            except OSError:
                pass
        try:
            self.watchdog.wait(timeout=STOP_GRACE_S + 10)
        except subprocess.TimeoutExpired:  # a stuck watchdog: its own SIGTERM handler stops the server too
            _signal_group(self.watchdog.pid, signal.SIGTERM)
            try:
                self.watchdog.wait(timeout=STOP_GRACE_S + 10)
            except subprocess.TimeoutExpired:
                _signal_group(self.watchdog.pid, signal.SIGKILL)
                self.watchdog.wait()


def last_log_line(path: Path, limit: int = 200) -> str:
    """The last non-empty line of a log (its tail only is read), shortened to ``limit`` characters."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 8192))
            lines = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_group(server: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to the server's group (vLLM shuts its engine down), then SIGKILL to whatever is left of it."""
    _signal_group(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(server.pid, signal.SIGKILL)  # also reaps engine processes that outlived the API server
    server.wait()


def _watch(command: list[str]) -> int:
    """The watchdog: run ``command`` in its own group until it exits or standard input closes. The stopping
    happens on a thread of its own, so the main thread keeps waiting for the server (and reaps it)."""
    server = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)

    def stop() -> None:
        threading.Thread(target=_stop_group, args=(server,), daemon=True).start()

    def stop_when_the_run_goes() -> None:
        try:  # the file descriptor, not sys.stdin: a daemon thread blocked in a buffered read aborts shutdown
            while os.read(0, 4096):  # nothing is ever written: this waits for end of file
                pass
        except OSError:
            pass
        stop()

    signal.signal(signal.SIGTERM, lambda signum, frame: stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the run, whose exit closes the pipe
    threading.Thread(target=stop_when_the_run_goes, daemon=True).start()
    status = server.wait()
    _signal_group(server.pid, signal.SIGKILL)  # engine processes left by a server that died
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sys.exit(_watch(arguments[1:] if arguments[:1] == ["--"] else arguments))
