"""A finished run's files -> one result row; rows -> each entry's mean and spread over seeds.

A row reads the engine's own files (``summary.json`` for the final held-out accuracy, ``metrics.jsonl``
for throughput and the final loss) and the bench's (``bench-train.json``: wall time and peak memory of
the training process; ``bench-eval.json``: the judged evaluation's result: reward, KL, length and the win
rates against the initial model).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from prefopt.bench.files import EVAL_FILE, RESULTS_FILE, TRAIN_FILE, read_json

# What the leaderboard aggregates over seeds, in its column order.
METRICS = ("reward", "kl", "length", "win_rate", "lc_win_rate", "accuracy", "tokens_per_s", "pairs_per_s",
           "peak_rss_mib", "wall_s", "final_loss")
# Added after the first results.jsonl files were written: a row without them has none (None).
LATER_METRICS = ("win_rate", "lc_win_rate")
ACCURACY_KEY = "eval/rewards/accuracies"


def metric_lines(run_dir: Path) -> list[dict]:
    """Every line of a run's metrics.jsonl. A staged run (algorithm stepwise) logs one per stage, in
    ``stages/stage-<t>/``: those are joined, each stage's steps counted on from the previous stage's last."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        return _read_lines(path)
    stages = sorted(Path(run_dir).glob("stages/stage-*/metrics.jsonl"), key=lambda p: int(p.parent.name[6:]))
    joined: list[dict] = []
    for stage in stages:
        offset = joined[-1]["step"] if joined else 0
        joined += [{**line, "step": line["step"] + offset} for line in _read_lines(stage)]
    return joined


def _read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_steps(run_dir: Path) -> list[dict]:
    """The training lines of a run's metrics (evaluation lines carry only eval/* keys)."""
    return [line for line in metric_lines(run_dir) if "loss" in line]


def run_row(entry: str, seed: int, overrides: list[str], run_dir: Path) -> dict | None:
    """The result row of a finished run, or None while any of its files is missing."""
    summary = read_json(run_dir / "summary.json")
    trained = read_json(run_dir / TRAIN_FILE)
    evaluated = read_json(run_dir / EVAL_FILE)
    if summary is None or trained is None or evaluated is None:
        return None
    steps = training_steps(run_dir)

    def median_of(key: str) -> float | None:
        values = [s[key] for s in steps if isinstance(s.get(key), (int, float))]
        # The median, not the mean: the first step also pays for warm-up (allocations, lazy init).
        return statistics.median(values) if values else None

    return {
        "entry": entry,
        "seed": seed,
        "overrides": list(overrides),
        "reward": evaluated["reward"],
        "kl": evaluated["kl"],
        "length": evaluated["length"],
        "win_rate": evaluated.get("win_rate"),
        "lc_win_rate": evaluated.get("lc_win_rate"),
        "accuracy": summary.get("eval_end", {}).get(ACCURACY_KEY),
        "tokens_per_s": median_of("tokens_per_s"),
        "pairs_per_s": median_of("pairs_per_s"),
        "peak_rss_mib": trained["peak_rss_mib"],
        "wall_s": trained["wall_s"],
        "final_loss": steps[-1]["loss"] if steps else None,
        "steps": summary.get("steps"),
        "resumed": trained.get("resumed", False),
        "eval_s": evaluated.get("eval_s"),
        "task_metrics": evaluated.get("metrics", {}),
        "eval_data_sha256": evaluated.get("eval_data_sha256"),
        "scored_data_sha256": evaluated.get("scored_data_sha256"),
        "run_dir": str(run_dir),
    }


def write_results(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_results(bench_dir: Path) -> list[dict]:
    from prefopt.errors import PrefoptError

    path = Path(bench_dir) / RESULTS_FILE
    if not path.is_file():
        raise PrefoptError(f"{path} not found: run the bench first (without --report-only)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrefoptError(f"{path} line {number}: not JSON ({exc.msg}); rerun the bench to rewrite it") from None
        missing = [k for k in ("entry", "seed", *METRICS) if k not in row and k not in LATER_METRICS]
        if missing:
            raise PrefoptError(f"{path} line {number}: missing {', '.join(missing)}; rerun the bench to rewrite it")
        rows.append({**{key: None for key in LATER_METRICS}, **row})
    return rows


# ----------------------------------------------------------------------------------------------------------
# aggregation over seeds


@dataclass(frozen=True)
class Spread:
    """A metric over an entry's seeds: mean, sample standard deviation (2+ values), min and max."""

    n: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None

    @classmethod
    def of(cls, values: list) -> "Spread":
        numbers = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if not numbers:
            return cls(0, None, None, None, None)
        std = statistics.stdev(numbers) if len(numbers) > 1 else None
        return cls(len(numbers), statistics.fmean(numbers), std, min(numbers), max(numbers))

    def as_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "std": self.std, "min": self.min, "max": self.max}


def aggregate(rows: list[dict], entry_order: list[str]) -> list[dict]:
    """One record per entry with a Spread per metric, best mean reward first (entries with no reward last,
    then in the recipe's order); where no entry has a reward (a pairwise judge gives none), best mean win rate
    first."""
    by_entry: dict[str, list[dict]] = {}
    for row in rows:
        by_entry.setdefault(row["entry"], []).append(row)
    order = {name: i for i, name in enumerate(entry_order)}
    records = []
    for entry, entry_rows in by_entry.items():
        entry_rows.sort(key=lambda r: r["seed"])
        records.append({
            "entry": entry,
            "seeds": [r["seed"] for r in entry_rows],
            "overrides": entry_rows[0].get("overrides", []),
            **{metric: Spread.of([r.get(metric) for r in entry_rows]) for metric in METRICS},
        })

    by = "reward" if any(record["reward"].mean is not None for record in records) else "win_rate"

    def rank(record: dict):
        mean = record[by].mean
        return (mean is None, -(mean or 0.0), order.get(record["entry"], len(order)))

    return sorted(records, key=rank)


def seed_mean_curves(rows: list[dict], keys: tuple[str, ...]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """entry -> key -> [(step, mean over the seeds that logged that step)], from each run's metrics.jsonl
    (training lines, and evaluation lines for eval/* keys)."""
    sums: dict[str, dict[str, dict[int, list[float]]]] = {}
    for row in rows:
        per_key = sums.setdefault(row["entry"], {key: {} for key in keys})
        for step in metric_lines(Path(row["run_dir"])):
            for key in keys:
                if isinstance(step.get(key), (int, float)):
                    per_key[key].setdefault(step["step"], []).append(step[key])
    return {
        entry: {key: [(s, statistics.fmean(v)) for s, v in sorted(steps.items())] for key, steps in per_key.items()}
        for entry, per_key in sums.items()
    }
