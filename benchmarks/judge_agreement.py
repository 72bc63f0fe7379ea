"""How often the llm_pairwise judge agrees with VADER, and how much it favours one position.

Reads the held-out pairs of the sentiment task (the quickstart recipe's data, built on first use), keeps
those whose VADER scores differ by more than ``--min-gap``, and asks the judge which completion is more
positive. The chosen completion is shown first in half the pairs and second in the other half, so a judge
that always answers "1" agrees on half. Prints, for one order and for both orders (``both_orders``):
agreement with VADER, how often the judge said "first", and the time taken.

    python benchmarks/judge_agreement.py                                  # the embedded SmolLM2-135M-Instruct
    python benchmarks/judge_agreement.py --judge /models/Qwen2.5-1.5B-Instruct
    python benchmarks/judge_agreement.py --json benchmarks/results/judge_agreement.json   # also the raw result

Nothing is downloaded for the embedded model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import provenance  # benchmarks/provenance.py, beside this script

from prefopt import JudgeContext
from prefopt.engine import build_task_data
from prefopt.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
from prefopt.registry.loading import default_plugins
from prefopt.recipe import load_recipe
from prefopt_plugins.judges.llm_pairwise import LLMPairwiseJudge

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = (
    "Which continuation of the text is more positive in sentiment?\n\nText: {prompt}\n\n"
    "Continuation 1: {first}\n\nContinuation 2: {second}\n\nReply with 1 or 2 only."
)


def held_out_rows(recipe_path: Path) -> list[dict]:
    plugins = default_plugins()
    recipe = load_recipe(recipe_path, plugins=plugins)
    model_path = resolve_model_path(recipe.model.path)
    tokenizer = load_tokenizer(model_path)
    load = lambda: load_causal_lm(model_path, dtype=recipe.model.dtype)  # noqa: E731  (only on a cache miss)
    _, data = build_task_data(recipe, plugins, model_path, tokenizer, load, show_progress=True)
    return [json.loads(line) for line in Path(data.eval).read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", default="smollm2-135m-instruct", help="algorithm.judge.path")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "dpo" / "quickstart.yaml",
                        help="a recipe whose data.task is sentiment")
    parser.add_argument("--min-gap", type=float, default=0.5, help="least VADER difference of a pair kept")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each setting (the time is their median)")
    parser.add_argument("--json", type=Path, help="also write the raw result here (with command, commit and load)")
    args = parser.parse_args()
    record = provenance.start()

    rows = [r for r in held_out_rows(args.recipe) if abs(r["chosen_reward"] - r["rejected_reward"]) > args.min_gap]
    chosen_first = [i % 2 == 0 for i in range(len(rows))]
    firsts = [r["chosen"] if first else r["rejected"] for r, first in zip(rows, chosen_first)]
    seconds = [r["rejected"] if first else r["chosen"] for r, first in zip(rows, chosen_first)]
    print(f"{len(rows)} held-out pairs whose VADER scores differ by more than {args.min_gap}; judge {args.judge}")
    settings = []
    for both_orders in (False, True):
        config = LLMPairwiseJudge.Config(path=args.judge, template=TEMPLATE, both_orders=both_orders)
        judge = LLMPairwiseJudge(config, JudgeContext())
        judge.prefer(["warm-up"], ["a"], ["b"])  # loads the model outside the timing
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            p_first = judge.prefer([r["prompt"] for r in rows], firsts, seconds)
            times.append(time.perf_counter() - started)
        judge.close()
        agree = sum((p > 0.5) == first for p, first in zip(p_first, chosen_first))
        said_first = sum(p > 0.5 for p in p_first)
        settings.append({"both_orders": both_orders, "agrees_with_vader": agree, "said_first": said_first,
                         "pairs": len(rows), "seconds": [round(t, 3) for t in times],
                         "seconds_median": round(statistics.median(times), 3),
                         "p_first": [round(p, 6) for p in p_first]})
        print(f"both_orders={str(both_orders).lower():5}  agrees with VADER {agree}/{len(rows)}  "
              f"said 'first' {said_first}/{len(rows)}  {statistics.median(times):.1f} s (median of {args.repeats})")
    if args.json:
        record.update(judge=args.judge, recipe=str(args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT)
                                                   else args.recipe), min_gap=args.min_gap, settings=settings)
        provenance.finish(record, args.json)
        print(f"-> {args.json}")

if __name__ == "__main__":
    main()
