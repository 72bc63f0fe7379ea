"""The evaluation child: score trained runs (or the initial model) with their task's evaluator.

    python -m prefopt.bench.evaluate --options '{"num_prompts": 64, ...}' [--initial] RECIPE [RECIPE ...]

Each RECIPE is a run's derived training recipe (``bench-recipe.yaml`` in its run directory); the result
goes to ``bench-eval.json`` beside it. The policy is the run's saved model (``<output.dir>/model``; a LoRA
adapter is merged into its base model in memory), or with ``--initial`` the initial model itself. The
reference is the run's: ``reference.path`` when set, else the initial model, so the KL of the initial
model to its own reference is 0. A separate process from training, so that loading two models here does
not count in the run's peak memory; one process evaluates all seeds of an entry, loading the reference
once.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
from pathlib import Path

from prefopt.errors import PrefoptError
from prefopt.api.task import KL_METRIC, EvalOptions, Task
from prefopt.bench.files import EVAL_FILE, write_json


def recipe_digest(text: str) -> str:
    """Identifies the recipe an evaluation was made for, so a changed recipe is evaluated again."""
    return hashlib.sha256(text.encode()).hexdigest()


def options_record(options: EvalOptions) -> dict:
    return {"num_prompts": options.num_prompts, "samples_per_prompt": options.samples_per_prompt,
            "max_new_tokens": options.max_new_tokens}


def call_evaluate(task: Task, model, tokenizer, data, reference, options: EvalOptions) -> dict[str, float]:
    """``task.evaluate`` with the reference and options when the task takes them: tasks written before
    these arguments existed take (model, tokenizer, data) and report no KL."""
    params = inspect.signature(task.evaluate).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {"reference": reference, "options": options}
    kwargs = {name: value for name, value in given.items() if name in params or open_ended}
    return task.evaluate(model, tokenizer, data, **kwargs)


class Evaluator:
    """Evaluates runs one after another, keeping the models every run shares (the reference) loaded."""

    def __init__(self, options: EvalOptions) -> None:
        from prefopt.registry.loading import default_plugins

        self.options = options
        self.plugins = default_plugins()
        self._models: dict[tuple[str, str], object] = {}

    def shared_model(self, path: str, recipe, revision: str | None = None):
        """A model loaded once per process (the initial model and the reference)."""
        from prefopt.models.loading import load_causal_lm

        key = (path, recipe.model.dtype)
        if key not in self._models:
            self._models[key] = load_causal_lm(
                path, dtype=recipe.model.dtype, revision=revision, trust_remote_code=recipe.model.trust_remote_code
            ).eval()
        return self._models[key]

    def evaluate(self, recipe_file: Path, *, initial: bool) -> dict:
        import torch

        from prefopt.engine import build_task_data
        from prefopt.models.loading import load_tokenizer, resolve_model_path
        from prefopt.recipe import load_recipe

        started = time.perf_counter()
        text = recipe_file.read_text()
        recipe = load_recipe(recipe_file, plugins=self.plugins)
        m = recipe.model
        model_path = resolve_model_path(m.path)
        reference_path = resolve_model_path(recipe.reference.path) if recipe.reference.path else model_path
        result = {
            "recipe_sha256": recipe_digest(text), "options": options_record(self.options), "task": None,
            "metrics": {}, "reward": None, "kl": None, "length": None, "eval_data_sha256": None,
            "scored_data_sha256": None,
            "policy": "initial model" if initial else str(Path(recipe.output.dir) / "model"),
            "reference": reference_path,
        }
        if recipe.data.task is not None:
            tokenizer = load_tokenizer(model_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
            initial_model = lambda: self.shared_model(model_path, recipe, m.revision)  # noqa: E731
            # Built by the training child already (the same recipe): found in the task's cache.
            task, data = build_task_data(recipe, self.plugins, model_path, tokenizer, initial_model,
                                         show_progress=False)
            policy = initial_model() if initial else load_trained(Path(recipe.output.dir) / "model", recipe)
            reference = initial_model() if reference_path == model_path else self.shared_model(reference_path, recipe)
            with torch.no_grad():
                metrics = call_evaluate(task, policy, tokenizer, data, reference, self.options)
            del policy
            metrics = {key: float(value) for key, value in metrics.items()}
            result.update(
                task=task.name, metrics=metrics,
                reward=metrics.get(task.reward_metric) if task.reward_metric else None,
                kl=metrics.get(KL_METRIC),
                length=metrics.get(task.length_metric) if task.length_metric else None,
                # Rewards compare only between runs scored on the same held-out prompts; the accuracy column
                # also needs the same held-out pairs.
                eval_data_sha256=hashlib.sha256(Path(data.eval).read_bytes()).hexdigest(),
                scored_data_sha256=hashlib.sha256(Path(data.scored_file).read_bytes()).hexdigest(),
            )
        result["eval_s"] = round(time.perf_counter() - started, 2)
        write_json(recipe_file.parent / EVAL_FILE, result)
        return result


def load_trained(model_dir: Path, recipe):
    """A run's saved model; a LoRA adapter is merged into a fresh copy of the base model it names (the
    initial model, or for a staged algorithm the previous stage's model)."""
    from prefopt.models.loading import load_causal_lm, resolve_model_path

    m = recipe.model
    adapter_config = model_dir / "adapter_config.json"
    if not adapter_config.is_file():
        return load_causal_lm(str(model_dir), dtype=m.dtype, trust_remote_code=m.trust_remote_code).eval()
    from peft import PeftModel

    base_path = json.loads(adapter_config.read_text()).get("base_model_name_or_path") or resolve_model_path(m.path)
    base = load_causal_lm(base_path, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
    return PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload().eval()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prefopt.bench.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", type=Path, metavar="RECIPE", help="derived training recipes")
    parser.add_argument("--options", default="{}", help="EvalOptions as JSON")
    parser.add_argument("--initial", action="store_true", help="evaluate the initial model, not the saved one")
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        evaluator = Evaluator(EvalOptions(**json.loads(args.options)))
        for recipe_file in args.recipes:
            result = evaluator.evaluate(recipe_file, initial=args.initial)
            shown = ", ".join(f"{k} {result[k]:.4g}" for k in ("reward", "kl", "length") if result[k] is not None)
            print(f"{recipe_file.parent}: {shown or 'no task metrics'} ({result['eval_s']:.0f} s)", flush=True)
    except PrefoptError as exc:
        print(f"prefopt: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
