"""Where a bench keeps what, and how its JSON files are written.

    <output.dir>/
      results.jsonl  leaderboard.md  leaderboard.html  leaderboard.json  *.png
      initial/  bench-recipe.yaml  bench-eval.json  bench-completions.jsonl    the untrained initial model, evaluated
      runs/<entry>/seed-<s>/                                    a run directory (the training recipe's output.dir)
        bench-recipe.yaml  bench-train.log  bench-train.json  bench-eval.json  bench-completions.jsonl
                                                                beside the engine's own files
      runs/<entry>/bench-eval.log                               the evaluation child of the entry's seeds
"""

from __future__ import annotations

import json
from pathlib import Path

from prefopt.paths import atomic_write_json

RECIPE_FILE = "bench-recipe.yaml"  # the derived training recipe the child is given
TRAIN_LOG = "bench-train.log"  # the training child's output
TRAIN_FILE = "bench-train.json"  # what the bench measured of the training child (wall time, peak memory)
EVAL_FILE = "bench-eval.json"  # the evaluation result
EVAL_LOG = "bench-eval.log"  # the evaluation child's output, one per entry
COMPLETIONS_FILE = "bench-completions.jsonl"  # the evaluated completions, one JSON line each, with their scores
RESULTS_FILE = "results.jsonl"


def write_json(path: Path, value) -> None:
    """Atomically: a file that exists is complete, which is what tells a rerun that a step is done."""
    atomic_write_json(path, value)


def read_json(path: Path):
    """The file's value, or None when it does not exist (not yet written)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def read_completions(path: Path) -> list[dict] | None:
    """A completions file's records (``COMPLETIONS_FILE``) in order; None when it does not exist. A line that is
    not a completion record (damaged, or hand-edited) is a one-line error naming the file and line."""
    from prefopt.errors import PrefoptError

    if not path.is_file():
        return None
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["prompt_index"], record["sample"] = int(record["prompt_index"]), int(record["sample"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise PrefoptError(f"{path} line {number}: not a completion record (JSON with prompt_index and sample); "
                               "delete the run's bench-eval.json to evaluate it again") from None
        records.append(record)
    return records
