"""What a benchmark's raw result records about how it was made: command, commit, date, machine and load.

Every script under ``benchmarks/`` that writes a raw file for ``benchmarks/results/`` starts its record
with ``start()`` and writes it with ``finish()``, so a reader of the file can tell what ran, on which code,
and how busy the machine was (other work slows timings, never the losses or rewards).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def start() -> dict:
    """The record's head: the command as typed (relative to the repository), commit, date, machine, and the
    1/5/15-minute load average now (``finish`` adds the one at the end)."""
    import torch

    script = os.path.relpath(sys.argv[0], ROOT)
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in [script, *sys.argv[1:]]),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_1_5_15": {"before": _load()}},
    }


def finish(record: dict, path: Path) -> None:
    """Add the load average at the end and write ``record`` to ``path`` as indented JSON (whole or not at all)."""
    record["machine"]["load_average_1_5_15"]["after"] = _load()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(staging, path)
