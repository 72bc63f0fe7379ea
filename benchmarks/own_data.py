"""One bench on a plain preference file, judged three ways: VADER, a reward model trained with prefopt, an LLM.

The sentiment task's pairs exported as plain JSONL stand in for a user's own data. The runs of
``recipes/bench/own-data.yaml`` (2 entries x 2 seeds) are trained once; each judge then evaluates the same
runs and the same initial model on the same held-out prompts and sampling seeds (a changed judge makes only
the evaluation stale, so the second and third benches train nothing):

- ``function``: VADER's compound score, the score the task's pairs were ranked by (the truth here);
- ``reward_model``: the Bradley-Terry model of ``recipes/reward/sentiment-rm.yaml`` (``runs/sentiment-rm/model``);
- ``llm_pairwise``: SmolLM2-135M-Instruct asked which continuation is more positive, both orders.

For each judge it writes, under ``--out/<judge>/``: the bench recipe it ran (``bench.yaml``), the bench's
``leaderboard.json``, ``leaderboard.md``, ``results.jsonl`` and plots, the initial model's evaluation and every
run's completions with their scores, and ``provenance.json`` (command, commit, machine, load, wall time).

    prefopt data recipes/dpo/quickstart.yaml --export data/sentiment-pairs
    prefopt train recipes/reward/sentiment-rm.yaml
    python benchmarks/own_data.py --out benchmarks/results/own_data
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import yaml

import bench_raw  # benchmarks/bench_raw.py and provenance.py, beside this script
import provenance

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "recipes/bench/own-data.yaml"
PAIRWISE_TEMPLATE = (  # the question benchmarks/judge_agreement.py measured the judge with
    "Which continuation of the text is more positive in sentiment?\n\nText: {prompt}\n\n"
    "Continuation 1: {first}\n\nContinuation 2: {second}\n\nReply with 1 or 2 only."
)


def judges(reward_model: str) -> dict[str, dict]:
    return {
        "function": {"name": "function", "function": "prefopt_plugins.tasks.sentiment:completion_reward"},
        "reward_model": {"name": "reward_model", "path": reward_model, "format": "plain"},
        "llm_pairwise": {"name": "llm_pairwise", "path": "smollm2-135m-instruct", "template": PAIRWISE_TEMPLATE},
    }


def bench_recipe(judge: dict, runs_dir: str, folder: Path) -> Path:
    """The shipped bench with this judge, and every judge's runs in one folder (trained once)."""
    tree = copy.deepcopy(yaml.safe_load(BENCH.read_text()))
    tree["base"] = os.path.relpath(BENCH.parent / tree["base"], folder)
    tree["eval"]["judge"] = judge
    tree["output"]["dir"] = runs_dir
    path = folder / "bench.yaml"
    path.write_text(f"# {BENCH.relative_to(ROOT)} with eval.judge and output.dir set by benchmarks/own_data.py\n"
                    + yaml.safe_dump(tree, sort_keys=False))
    return path


def run(judge_name: str, judge: dict, args, out: Path) -> None:
    folder = out / judge_name
    folder.mkdir(parents=True, exist_ok=True)
    recipe = bench_recipe(judge, args.runs_dir, folder)
    record = bench_raw.run_bench(recipe.relative_to(ROOT), folder)
    bench_raw.keep_results(ROOT / args.runs_dir, folder, per_run=["bench-completions.jsonl"])
    provenance.finish(record, folder / "provenance.json")
    print(f"{judge_name}: {record['bench_wall_seconds']} s -> {folder.relative_to(ROOT)}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/own_data")
    parser.add_argument("--reward-model", default="runs/sentiment-rm/model")
    parser.add_argument("--runs-dir", default="runs/bench/own-data-judged", help="where the bench's runs go")
    parser.add_argument("--judges", default="function,reward_model,llm_pairwise")
    args = parser.parse_args()
    if not (ROOT / "data/sentiment-pairs/test.jsonl").is_file():
        sys.exit("data/sentiment-pairs/ is missing: prefopt data recipes/dpo/quickstart.yaml --export data/sentiment-pairs")
    available = judges(args.reward_model)
    for name in args.judges.split(","):
        run(name, available[name], args, args.out.resolve())


if __name__ == "__main__":
    main()
