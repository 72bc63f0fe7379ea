"""How well a reward model trained with prefopt agrees with VADER on the sentiment task's held-out data.

Trains nothing: it reads a saved reward model (``recipes/reward/sentiment-rm.yaml`` writes
``runs/sentiment-rm/model``) and scores, through the ``reward_model`` judge exactly as a bench would, both
completions of every held-out pair of that recipe's task data. It reports

- pair accuracy: the share of held-out pairs whose chosen completion (VADER's best of four) the reward model
  scores higher, ties counted half (what training's ``eval/rewards/accuracies`` measures, here through the
  judge);
- the rank correlation (Spearman) and linear correlation (Pearson) between the reward model's score and
  VADER's over every held-out completion, chosen and rejected alike: agreement beyond the pairs' order.

    prefopt train recipes/reward/sentiment-rm.yaml
    python benchmarks/reward_model_agreement.py --json benchmarks/results/reward_model_agreement.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import provenance  # benchmarks/provenance.py, beside this script

ROOT = Path(__file__).resolve().parents[1]


def held_out_pairs(recipe_path: Path) -> list[dict]:
    """The held-out pairs of the recipe's task data (built on first use), each with both VADER rewards."""
    from prefopt.engine import build_task_data
    from prefopt.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
    from prefopt.recipe import load_recipe
    from prefopt.registry.loading import default_plugins

    plugins = default_plugins()
    recipe = load_recipe(recipe_path, plugins=plugins)
    model_path = resolve_model_path(recipe.model.path)
    load = lambda: load_causal_lm(model_path, dtype=recipe.model.dtype)  # noqa: E731  (only on a cache miss)
    _, data = build_task_data(recipe, plugins, model_path, load_tokenizer(model_path), load, show_progress=True)
    return [json.loads(line) for line in Path(data.eval).read_text().splitlines() if line.strip()]


def ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions), for Spearman's correlation."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2
        start = end + 1
    return result


def main() -> None:
    from prefopt import JudgeContext
    from prefopt_plugins.judges.reward_model import RewardModelJudge

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/sentiment-rm/model", help="the saved reward model")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "reward" / "sentiment-rm.yaml",
                        help="the recipe it was trained with (its task data's held-out pairs are scored)")
    parser.add_argument("--json", type=Path, help="also write the raw result here (with command, commit and load)")
    args = parser.parse_args()
    record = provenance.start()

    pairs = held_out_pairs(args.recipe)
    judge = RewardModelJudge(RewardModelJudge.Config(path=args.model, format="plain"), JudgeContext())
    started = time.perf_counter()
    prompts = [p["prompt"] for p in pairs]
    chosen = judge.scores(prompts, [p["chosen"] for p in pairs])
    rejected = judge.scores(prompts, [p["rejected"] for p in pairs])
    seconds = time.perf_counter() - started
    judge.close()

    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
    model_scores = chosen + rejected
    vader = [p["chosen_reward"] for p in pairs] + [p["rejected_reward"] for p in pairs]
    result = {
        "model": args.model, "recipe": str(args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT)
                                           else args.recipe),
        "pairs": len(pairs), "pair_accuracy": statistics.fmean(wins),
        "spearman": statistics.correlation(ranks(model_scores), ranks(vader)),
        "pearson": statistics.correlation(model_scores, vader), "scoring_seconds": round(seconds, 2),
        "scores": [{"chosen": c, "rejected": r, "chosen_vader": p["chosen_reward"],
                    "rejected_vader": p["rejected_reward"]} for c, r, p in zip(chosen, rejected, pairs)],
    }
    print(f"{len(pairs)} held-out pairs: pair accuracy {result['pair_accuracy']:.3f}; over {len(vader)} completions "
          f"Spearman {result['spearman']:.3f}, Pearson {result['pearson']:.3f} with VADER ({seconds:.0f} s)")
    if args.json:
        record.update(result)
        provenance.finish(record, args.json)
        print(f"-> {args.json}")


if __name__ == "__main__":
    main()
