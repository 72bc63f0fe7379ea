"""How likely each trained model of a bench is to stop: log p(EOS) on the held-out pairs' responses.

A sampled completion's length is decided by one token, EOS. This script reads a finished bench's output
directory (``runs/<entry>/seed-<s>/`` with a saved ``model/``), tokenizes every run's held-out pairs the
way training did (EOS appended), and prints, for the initial model and each run, the mean over pairs of

- ``end chosen`` / ``end rejected``: log p(EOS) at the position where the chosen / rejected response ends;
- ``inside chosen`` / ``inside rejected``: log p(EOS) averaged over the response's other positions.

Each row names the first characters of its held-out file's sha256: entries labelled differently hold
out different pairs, and the initial model is probed on each such file.

Differences from the initial model say whether training taught the model to stop sooner or later,
everywhere or only where the preferred responses end. It explains the length column of
``recipes/bench/length.yaml`` (benchmarks/README.md, claim 3):

    python benchmarks/eos_probe.py runs/bench/length
    python benchmarks/eos_probe.py runs/bench/length --json eos.json

Runs on CPU in about 2 minutes for 8 runs of SmolLM2-135M with 64 held-out pairs; nothing is downloaded
(the bench built the task data and converted the model already).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

import torch

from prefopt.bench.evaluate import load_trained
from prefopt.data import for_loss, load_rows, to_examples, tokenize_examples
from prefopt.engine import build_task_data
from prefopt.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
from prefopt.registry.loading import default_plugins
from prefopt.recipe import load_recipe

COLUMNS = ("end chosen", "end rejected", "inside chosen", "inside rejected")


def held_out_pairs(recipe, plugins, tokenizer, model_path: str):
    """A short hash of the run's held-out file, and its pairs tokenized with the run's data settings (the
    task's cache has the file)."""
    if recipe.data.task is None:
        sys.exit(f"eos_probe: {recipe.output.dir}: the recipe has no data.task; this script reads task benches")
    no_model = lambda: sys.exit("eos_probe: the task data is not cached; run the bench first")  # noqa: E731
    _, data = build_task_data(recipe, plugins, model_path, tokenizer, no_model, show_progress=False)
    d = recipe.data
    rows = load_rows(data.eval, "train", None, False)
    examples, _, _ = to_examples(rows, d.columns.model_dump(), d.format, data.eval)
    examples = for_loss(examples, unpaired=False, loss_name="dpo", fmt=d.format, source=data.eval)
    digest = hashlib.sha256(Path(data.eval).read_bytes()).hexdigest()[:6]
    return digest, tokenize_examples(
        examples, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
        append_eos=True, invalid_rows="skip", source=data.eval,
    ).pairs


@torch.no_grad()
def eos_logps(model, pairs, eos_id: int) -> dict[str, float]:
    """The four means of COLUMNS over ``pairs``."""
    values: dict[str, list[float]] = {column: [] for column in COLUMNS}
    for pair in pairs:
        for side, response in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            ids = torch.tensor([list(pair.prompt_ids) + list(response)])
            logp_eos = model(input_ids=ids).logits[0].float().log_softmax(-1)[:, eos_id]
            # position t predicts token t + 1: the response's k-th token is predicted at len(prompt) - 1 + k
            start = len(pair.prompt_ids) - 1
            at_response = logp_eos[start : start + len(response)]
            values[f"end {side}"].append(at_response[-1].item())
            if len(response) > 1:
                values[f"inside {side}"].append(at_response[:-1].mean().item())
    return {column: statistics.fmean(v) for column, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_dir", type=Path, help="a bench's output.dir, e.g. runs/bench/length")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()
    recipes = sorted(args.bench_dir.glob("runs/*/seed-*/bench-recipe.yaml"))
    recipes = [r for r in recipes if (r.parent / "model").is_dir()]
    if not recipes:
        sys.exit(f"eos_probe: no finished runs under {args.bench_dir}/runs/<entry>/seed-<s>/ (model/ saved)")

    plugins = default_plugins()
    table: list[dict] = []
    base = None
    probed: set[str] = set()

    def add(name: str, held_out: str, values: dict[str, float]) -> None:
        table.append({"model": name, "held_out": held_out, **values})
        print(f"{name:<32}" + "".join(f"{values[c]:>17.2f}" for c in COLUMNS), flush=True)

    print(f"{'model':<32}" + "".join(f"{c:>17}" for c in COLUMNS))
    for recipe_file in recipes:
        recipe = load_recipe(recipe_file, plugins=plugins)
        model_path = resolve_model_path(recipe.model.path)
        tokenizer = load_tokenizer(model_path, revision=recipe.model.revision)
        held_out, pairs = held_out_pairs(recipe, plugins, tokenizer, model_path)
        # entries labelled differently hold out other pairs: the initial model is probed on each file once
        if held_out not in probed:
            probed.add(held_out)
            base = base or load_causal_lm(model_path, dtype=recipe.model.dtype).eval()
            add(f"initial ({held_out})", held_out, eos_logps(base, pairs, tokenizer.eos_token_id))
        run = recipe_file.parent
        model = load_trained(run / "model", recipe)
        name = f"{run.parent.name} seed {run.name.removeprefix('seed-')} ({held_out})"
        add(name, held_out, eos_logps(model, pairs, tokenizer.eos_token_id))
        del model
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
