"""Metric records: ``metrics.jsonl`` and the trackers, and how a resumed run keeps the file reading as one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefopt.engine.run import Run


def record(run: Run, path: Path, step: int, values: dict[str, float], *, before_step: bool = False) -> None:
    """Log ``values`` at ``step``. ``before_step`` marks what an algorithm measured before training step
    ``step + 1`` (a round's sampling), which a run resumed at ``step`` measures again."""
    if not values:
        return
    run.accelerator.log(values, step=step)
    if run.is_main:
        with path.open("a") as f:
            f.write(json.dumps({"step": step, **({"before_step": True} if before_step else {}), **values}) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop what a run resumed at ``step`` writes again (lines after ``step``, and what was measured before the
    step that follows it), so the file reads like one run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        record = json.loads(line) if line else None
        if record and (record["step"] < step or record["step"] == step and not record.get("before_step")):
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def format_metrics(head: str, values: dict[str, float]) -> str:
    shown = ", ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in sorted(values.items()))
    return f"{head}: {shown}"


def flat_config(recipe) -> dict[str, Any]:
    """The recipe as flat scalars, which is what TensorBoard's hparams accept."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    walk("", recipe.model_dump(mode="json"))
    return flat
