"""Run a bench recipe and keep its raw results in the repository, with how and where they were made.

``prefopt bench RECIPE`` writes its runs under the recipe's ``output.dir`` (``runs/bench/...``, which git
ignores). This script runs it, then copies what a reader needs to check every number benchmarks/README.md
quotes from it into ``--out``:

- the bench's ``leaderboard.json``, ``leaderboard.md``, ``results.jsonl`` and plots (every ``*.png``);
- the initial model's evaluation and completions, and every run's evaluation (its metrics and the reference its
  KL is measured against) and completions with their scores;
- every run's ``metrics.jsonl`` and ``summary.json`` (training curves, held-out metrics at each evaluation),
  and ``bench-train.json`` (the run's wall time and peak memory); a staged run's ``stages.json`` and each stage's
  ``metrics.jsonl`` and ``summary.json``;
- ``provenance.json``: command, commit, date, machine, the load at the start and the end, and wall time.

    python benchmarks/bench_raw.py recipes/bench/dpop-small-edits.yaml --out benchmarks/results/claims/dpop-small-edits
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance.py sits beside this script
import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEPT = ["leaderboard.json", "leaderboard.md", "results.jsonl", "initial/bench-eval.json",
        "initial/bench-completions.jsonl"]
# A staged run (sDPO) also keeps its plan and each stage's curves and held-out metrics.
KEPT_PER_RUN = ["bench-completions.jsonl", "bench-eval.json", "metrics.jsonl", "summary.json", "bench-train.json",
                "stages.json", "stages/*/metrics.jsonl", "stages/*/summary.json"]


def keep_results(runs_dir: Path, folder: Path, per_run: list[str] = KEPT_PER_RUN) -> None:
    """Copy a finished bench's raw files from ``runs_dir`` (its output.dir) into ``folder``, paths kept."""
    for name in KEPT:
        if (runs_dir / name).is_file():
            _copy(runs_dir / name, folder / name)
    for plot in sorted(runs_dir.glob("*.png")):
        _copy(plot, folder / plot.name)
    for name in per_run:
        for path in sorted(runs_dir.glob(f"runs/*/seed-*/{name}")):
            _copy(path, folder / path.relative_to(runs_dir))


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def run_bench(recipe: Path, folder: Path, extra_args: list[str] = ()) -> dict:
    """``prefopt bench recipe``, timed, with the provenance record it ran under (not yet finished)."""
    record = provenance.start()
    command = ["prefopt", "bench", str(recipe), "--no-progress", *extra_args]
    began = time.perf_counter()
    status = subprocess.run(command, cwd=ROOT, check=False).returncode
    if status:  # the bench has said why on stderr; nothing is copied from a bench that did not finish
        sys.exit(status)
    record["bench_command"] = " ".join(command)
    record["bench_wall_seconds"] = round(time.perf_counter() - began, 1)
    return record


def output_dir(recipe: Path) -> Path:
    """The bench's output.dir: where its runs and leaderboard are (relative paths are from the checkout)."""
    tree = yaml.safe_load(recipe.read_text())
    folder = Path(tree.get("output", {}).get("dir") or Path("runs/bench") / recipe.stem)
    return folder if folder.is_absolute() else ROOT / folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", type=Path, help="a bench recipe, e.g. recipes/bench/frontier-reduced.yaml")
    parser.add_argument("--out", type=Path, required=True, help="where the raw files go (under benchmarks/results/)")
    args = parser.parse_args()
    recipe = args.recipe.resolve()
    record = run_bench(recipe.relative_to(ROOT), args.out)
    keep_results(output_dir(recipe), args.out)
    provenance.finish(record, args.out / "provenance.json")
    print(f"{record['bench_wall_seconds']} s -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
