"""HTTP calls to a vLLM server (``vllm serve``), for the ``vllm_server`` sampler.

Standard library only (``urllib``): the ``reload`` transport and sampling need no vLLM in the training
process, only a server to talk to. Every failure becomes one line naming the server and what to do:

- no answer (connection refused or reset, or no reply in time): the server is down or hung. Before the first
  answer that means nothing runs there; afterwards it died mid-run, and the message says that rerunning the
  same command resumes from the last checkpoint. A launched server adds how it exited and where its log is
  (``describe_exit``);
- 404 on an endpoint the sampler needs: the server runs without ``VLLM_SERVER_DEV_MODE=1``, which is what
  exposes the weight-sync and cache endpoints;
- any other error status: what the server said, first line only.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Optional

from prefopt.errors import PrefoptError

RESUME_HINT = "once a server runs there again, rerun the same command: the run resumes from its last checkpoint"
DEV_MODE_HINT = ("start it with VLLM_SERVER_DEV_MODE=1 (the weight-sync and cache endpoints), or let the sampler "
                 "start one (algorithm.sampler.launch)")


class ServerClient:
    """JSON over HTTP to one vLLM server; ``describe_exit`` says how a launched server ended (None: it runs,
    or was not launched here)."""

    def __init__(self, url: str, timeout_s: float,
                 describe_exit: Optional[Callable[[], Optional[str]]] = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.describe_exit = describe_exit or (lambda: None)
        self.answered = False  # has the server answered once: a later silence means it died mid-run

    def get(self, path: str, *, what: str, timeout_s: Optional[float] = None) -> Any:
        return self.request("GET", path, None, what=what, timeout_s=timeout_s)

    def post(self, path: str, body: Optional[dict] = None, *, what: str, query: Optional[dict] = None,
             timeout_s: Optional[float] = None) -> Any:
        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        return self.request("POST", path, body if body is not None else {}, what=what, timeout_s=timeout_s)

    def healthy(self, timeout_s: float = 5.0) -> bool:
        """Whether ``/health`` answers 200 now (no error: for polling while a server starts)."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout_s) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def request(self, method: str, path: str, body: Optional[dict], *, what: str,
                timeout_s: Optional[float] = None) -> Any:
        """The decoded JSON answer (None for an empty one); a failure is a ``PrefoptError`` of one line."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            self.answered = True
            raise PrefoptError(self._refused(exc, path.split("?")[0], what)) from None
        except (socket.timeout, TimeoutError):
            raise PrefoptError(self._silent(f"did not answer within {timeout:g} s", what)) from None
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PrefoptError(self._silent(f"does not answer ({_first_line(reason)})", what)) from None
        self.answered = True
        return json.loads(payload) if payload.strip() else None

    def _silent(self, how: str, what: str) -> str:
        exit_note = self.describe_exit()
        exit_note = f"; {exit_note}" if exit_note else ""
        if not self.answered:
            return (f"sampler vllm_server: the vLLM server at {self.url} {how} while {what}{exit_note}; start one "
                    "(VLLM_SERVER_DEV_MODE=1 vllm serve <model>) or set algorithm.sampler.launch to start it here")
        return f"sampler vllm_server: the vLLM server at {self.url} {how} while {what}{exit_note}; {RESUME_HINT}"

    def _refused(self, exc: urllib.error.HTTPError, path: str, what: str) -> str:
        if exc.code == 404:
            return f"sampler vllm_server: the vLLM server at {self.url} has no {path} endpoint ({what}); {DEV_MODE_HINT}"
        message = f"sampler vllm_server: the vLLM server at {self.url} refused {what}: HTTP {exc.code}: {_error_detail(exc)}"
        return f"{message}; {RESUME_HINT}" if exc.code >= 500 else message  # 5xx: the server is failing


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """What the server said went wrong: the ``error``/``detail``/``message`` field of its JSON, first line."""
    try:
        text = exc.read().decode(errors="replace")
    except OSError:
        text = ""
    try:
        answer = json.loads(text)
    except ValueError:
        return _first_line(text or exc.reason, limit=300)
    for key in ("error", "detail", "message"):
        value = answer.get(key) if isinstance(answer, dict) else None
        if isinstance(value, dict):  # OpenAI style: {"error": {"message": ...}}
            value = value.get("message")
        if value:
            return _first_line(value if isinstance(value, str) else json.dumps(value), limit=300)
    return _first_line(text, limit=300)


def _first_line(value: object, limit: int = 200) -> str:
    text = str(value).strip()
    line = text.splitlines()[0] if text else type(value).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
