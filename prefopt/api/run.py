"""Training from Python: ``load_recipe``, ``train`` and the ``TrainResult`` it returns.

What ``prefopt validate`` and ``prefopt train`` do, as functions: the same validation, the same one-line
errors (``prefopt.PrefoptError``), the same run directory. Heavy modules (torch, transformers) are imported
when a function is called, not when ``prefopt`` is imported.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from prefopt.api.callbacks import EVAL_PREFIX, active_callbacks
from prefopt.errors import PrefoptError, RecipeError

__all__ = ["TrainResult", "load_recipe", "train"]

DICT_SOURCE = "recipe"  # how errors name a recipe given as a dict


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left: where, what it measured, and the model it saved."""

    run_dir: Path  # output.dir: recipe.yaml, metrics.jsonl, checkpoints/, model/, summary.json
    final_metrics: dict[str, float]  # the last training record (step, loss, rewards/accuracies, lr, ...)
    eval_metrics: dict[str, float]  # held-out metrics at the end (eval/...); empty without held-out data
    initial_eval_metrics: dict[str, float] | None  # held-out metrics before training, if eval.at_start
    model_path: Path | None  # the saved model (Hugging Face format), None when output.save_model is false
    summary: dict[str, Any]  # summary.json
    steps: int  # optimizer steps the run took in all (resumed runs included)


def load_recipe(source: str | Path | Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] | None = None,
                *, plugins=None):
    """The validated recipe from ``source``: a YAML file's path, or a recipe as a dict (as the YAML would
    read). ``overrides`` are ``"dotted.key=value"`` strings (values read as YAML, as on the command line) or a
    dict of dotted keys to values (used as they are). ``plugins`` defaults to the installed ones.

    Every problem raises ``prefopt.RecipeError`` (a ``PrefoptError``) with the message ``prefopt validate``
    prints: the source, then each problem's dotted key and what is wrong with it."""
    from prefopt.recipe import apply_override, check_prompt_only_data, parse_override, read_yaml, validate_tree
    from prefopt.registry.loading import default_plugins

    plugins = plugins or default_plugins()
    if isinstance(source, Mapping):
        tree, name = copy.deepcopy(dict(source)), DICT_SOURCE
    elif isinstance(source, (str, Path)):
        tree, name = read_yaml(Path(source)), str(Path(source))  # named as prefopt validate names it
    else:
        raise PrefoptError(f"load_recipe: source is a {type(source).__name__}; give a recipe file's path or a dict")
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            apply_override(tree, key.split("."), copy.deepcopy(value))
    else:
        for text in overrides or ():
            apply_override(tree, *parse_override(text))
    recipe = validate_tree(tree, plugins, name)
    # as prefopt validate: prompt-only data only for an algorithm that makes its own pairs
    try:
        algorithm = plugins.algorithms.get(recipe.algorithm.name) if recipe.algorithm is not None else None
        check_prompt_only_data(recipe, algorithm)
    except PrefoptError as exc:
        raise RecipeError(name, [str(exc)]) from None
    return recipe


def train(recipe, *, callbacks: Iterable[Any] = (), progress: bool = False, resume_from: str | Path | None = None,
          allow_changed: Iterable[str] = (), plugins=None) -> TrainResult:
    """Train as ``prefopt train`` does and return what the run left.

    ``recipe`` is a validated recipe (``load_recipe``), a dict or a file's path. A rerun with the same
    ``output.dir`` resumes from the newest intact checkpoint; ``resume_from`` names another checkpoint folder
    (``<run>/checkpoints/step-N``) and ``allow_changed`` the recipe keys that may differ from the checkpoint's
    (as ``--allow-changed``). ``callbacks`` (``prefopt.Callback``) are called on the main process for every
    metrics record the run writes; an exception one raises stops the run and is raised here. ``progress``
    shows progress bars. Problems raise ``prefopt.PrefoptError``."""
    from prefopt.engine import run as run_engine
    from prefopt.recipe import derive_recipe
    from prefopt.registry.loading import default_plugins

    plugins = plugins or default_plugins()
    source = str(Path(recipe)) if isinstance(recipe, (str, Path)) else DICT_SOURCE
    if isinstance(recipe, (str, Path, Mapping)):
        recipe = load_recipe(recipe, plugins=plugins)
    allowed = [key for key in allow_changed if key]
    if allowed:
        change = {"train.allow_changed": [*recipe.train.allow_changed, *allowed]}
        recipe = derive_recipe(recipe, plugins, change, source)
    callbacks = list(callbacks)
    last = _LastRecords()
    with active_callbacks([last, *callbacks]):
        summary = run_engine(recipe, plugins, show_progress=progress, resume_from=resume_from)
    result = _result(recipe, summary, last)
    for callback in callbacks:
        end = getattr(callback, "on_train_end", None)
        if end is not None:
            end(result)
    return result


class _LastRecords:
    """Keeps the last training record a run writes (the loss and the rest of its step's metrics)."""

    def __init__(self) -> None:
        self.training: dict[str, float] | None = None

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if "loss" in metrics:  # not what an algorithm measured before a step
            self.training = {"step": step, **metrics}


def _result(recipe, summary: dict, last: _LastRecords) -> TrainResult:
    run_dir = Path(recipe.output.dir)
    model = run_dir / "model"
    return TrainResult(
        run_dir=run_dir,
        final_metrics=last.training if last.training is not None else _last_training_record(run_dir),
        eval_metrics=dict(summary.get("eval_end") or {}),
        initial_eval_metrics=dict(summary["eval_start"]) if summary.get("eval_start") else None,
        model_path=model if recipe.output.save_model and model.is_dir() else None,
        summary=summary,
        steps=int(summary.get("steps", 0)),
    )


def _last_training_record(run_dir: Path) -> dict[str, float]:
    """The last training line of ``metrics.jsonl``: a rerun of a finished run trains no step of its own."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    found: dict[str, float] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            values = json.loads(line)
        except ValueError:
            continue
        if isinstance(values, dict) and "loss" in values and not values.get("before_step"):
            found = {k: v for k, v in values.items() if not k.startswith(EVAL_PREFIX)}
    return found
