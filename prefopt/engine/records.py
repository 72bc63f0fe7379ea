"""Metric records: ``metrics.jsonl`` and the trackers, and how a resumed run keeps the file reading as one.

A line is appended whole or not at all (a write cut short by a full disk is undone), and the file is cut
back on resume by an atomic rewrite, so a crash never leaves it half written; a last line torn by a crash
before these guards (or by a copy cut short) is dropped on resume, with a note.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from prefopt.api.callbacks import notify_record
from prefopt.disk import writing
from prefopt.engine.run import Run
from prefopt.errors import PrefoptError
from prefopt.paths import atomic_write_text
from prefopt.recipe.flatten import flatten


def record(run: Run, path: Path, step: int, values: dict[str, float], *, before_step: bool = False) -> None:
    """Log ``values`` at ``step``. ``before_step`` marks what an algorithm measured before training step
    ``step + 1`` (a round's sampling), which a run resumed at ``step`` measures again."""
    if not values:
        return
    run.accelerator.log(values, step=step)
    if run.is_main:
        append_line(path, json.dumps({"step": step, **({"before_step": True} if before_step else {}), **values}))
        notify_record(step, values)  # the caller's callbacks (prefopt.train); one that raises stops the run


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline to ``path``, whole or not at all: when the write fails (a full disk) the
    file is cut back to its old end, and the failure is one line naming the file."""
    data = (line + "\n").encode()
    with writing(path, "metrics", elsewhere="output.dir"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(data):  # a write may take only part of the bytes
                    written += os.write(fd, data[written:])
            except BaseException:
                os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)


def truncate_metrics(path: Path, step: int, say: Callable[[str], None] = tqdm.write) -> None:
    """Drop what a run resumed at ``step`` writes again (lines after ``step``, and what was measured before the
    step that follows it), so the file reads like one run."""
    cut_jsonl(path, lambda r: r["step"] < step or r["step"] == step and not r.get("before_step"), "metrics", say)


def cut_jsonl(path: Path, keep: Callable[[dict], bool], what: str, say: Callable[[str], None] = tqdm.write) -> None:
    """Keep the records of a run's JSONL file (each a dict with an int ``step``) that ``keep`` accepts. A torn last
    line (a write a crash cut off) is dropped with a note; a damaged line elsewhere is for the user to look at, so
    it stops the run. The file is rewritten atomically, and only when a line goes."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        record = _parse_record(line)
        if record is None and number == len(lines):
            say(f"note: the last line of {path} was cut off by an interrupted write; dropped it")
        elif record is None:
            raise PrefoptError(f"{path} line {number} is not a {what} record; repair or delete that line, then rerun")
        elif keep(record):
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _parse_record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def format_metrics(head: str, values: dict[str, float]) -> str:
    shown = ", ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in sorted(values.items()))
    return f"{head}: {shown}"


def flat_config(recipe) -> dict[str, Any]:
    """The recipe as flat scalars, the hyperparameters every tracker gets (TensorBoard's hparams accept only
    scalars): lists and None as their text."""
    flat = flatten(recipe.model_dump(mode="json"))
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in flat.items()}
