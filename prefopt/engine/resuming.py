"""Which checkpoint a run resumes from, and whether it may: a run resumes only under the recipe it was started
with.

Rerunning ``prefopt train`` on an ``output.dir`` that holds checkpoints continues the newest intact one
(``checkpoint.latest_checkpoint``); ``--resume-from PATH`` names one. Either way the checkpoint's recipe (its
``recipe.yaml``; for a checkpoint from before checkpoints held one, the run's) is compared with the new
recipe, key by key, before anything is written: a change of anything that changes the numbers (the loss and
its options, the learning rate, the data, the model, the seed...) stops the run with one line listing the
changed keys, rather than mixing two recipes in one run. Keys that only say how long to train, what to
evaluate, how often to log or save, and where to write may change (``SAFE_TO_CHANGE``); any other key may
change when the recipe's ``train.allow_changed`` (``--allow-changed``) lists it or its section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import yaml

from prefopt.engine import checkpoint as ckpt
from prefopt.errors import PrefoptError, did_you_mean
from prefopt.recipe import dump_recipe, validate_tree
from prefopt.recipe.flatten import flatten
from prefopt.registry.loading import Plugins

__all__ = ["SAFE_TO_CHANGE", "changed_keys", "check_same_recipe", "checkpoint_to_resume"]

# Keys (and sections) a resumed run may change without asking: none changes the steps already taken or the
# update of the steps to come, except that a longer run also stretches a decaying learning-rate schedule,
# which is what asking for more steps means.
SAFE_TO_CHANGE = (
    "train.max_steps", "train.epochs", "train.log_every", "train.eval_every", "train.save_every",
    "train.keep_checkpoints", "train.on_nonfinite", "train.max_nonfinite_in_a_row", "train.allow_changed",
    "eval", "data.eval_split", "data.max_eval_pairs", "output",
)
_SHOWN = 4  # changed keys spelled out in the message; the rest are counted


def checkpoint_to_resume(recipe, resume_from: str | Path | None, say: Callable[[str], None]) -> Path | None:
    """The checkpoint this run continues: ``resume_from`` when given (``--resume-from``), else the newest intact
    one in ``output.dir`` when ``output.resume`` is auto; None for a fresh run."""
    run_dir = Path(recipe.output.dir)
    if resume_from is not None:
        return _named_checkpoint(run_dir, Path(resume_from))
    if recipe.output.resume == "never":
        if ckpt.checkpoints(run_dir):
            raise PrefoptError(
                f"output.dir {run_dir} already holds checkpoints; set output.resume=auto to continue that run "
                "or choose another output.dir"
            )
        return None
    return ckpt.latest_checkpoint(run_dir, say)


def _named_checkpoint(run_dir: Path, path: Path) -> Path:
    """A checkpoint named by the user, checked whole, into a run directory whose checkpoints it cannot clash
    with (the resumed run would replace those at or after its step)."""
    ckpt.check_intact(path)
    step = json.loads((path / "state.json").read_text())["step"]
    later = [p for s, p in ckpt.checkpoints(run_dir) if s >= step and p.resolve() != path.resolve()]
    if later:
        raise PrefoptError(
            f"--resume-from {path}: output.dir {run_dir} holds checkpoints at or after its step {step} "
            f"({later[-1].name}), which the resumed run would replace; choose a new output.dir"
        )
    return path


def check_same_recipe(recipe, checkpoint: Path, plugins: Plugins, say: Callable[[str], None]) -> None:
    """Refuse to resume ``checkpoint`` under a recipe that changes its numbers (see the module's docstring)."""
    saved = checkpoint / "recipe.yaml"
    if not saved.is_file():
        saved = checkpoint.parent.parent / "recipe.yaml"  # a checkpoint from before checkpoints held the recipe
    if not saved.is_file():
        say(f"checkpoint {checkpoint} holds no recipe: resuming it without comparing recipes")
        return
    before = _as_this_prefopt_writes_it(saved, plugins)
    now = flatten(yaml.safe_load(dump_recipe(recipe)))
    changed = changed_keys(before, now)
    allowed = list(recipe.train.allow_changed)
    _check_allowed_keys(allowed, before.keys() | now.keys())
    refused = [key for key in changed if not _covered(key, (*SAFE_TO_CHANGE, *allowed))]
    if refused:
        shown = "; ".join(_difference(key, before, now) for key in refused[:_SHOWN])
        more = f" (and {len(refused) - _SHOWN} more)" if len(refused) > _SHOWN else ""
        raise PrefoptError(
            f"checkpoint {checkpoint} was trained under another recipe: {shown}{more}; rerun with the recipe it "
            f"was started with, choose a new output.dir, or allow the change with --allow-changed "
            f"{','.join(refused)} (recipe key train.allow_changed)"
        )
    noted = [key for key in changed if not _covered(key, SAFE_TO_CHANGE)]
    if noted:
        say(f"note: resuming {checkpoint} under a changed recipe, as train.allow_changed allows: "
            + "; ".join(_difference(key, before, now) for key in noted))


def _as_this_prefopt_writes_it(saved: Path, plugins: Plugins) -> dict[str, Any]:
    """The saved recipe, flat, with the defaults of keys added since it was written filled in (validated
    again), so that a new key reads as unchanged; as written when it no longer validates (a key removed)."""
    tree = yaml.safe_load(saved.read_text()) or {}
    try:
        tree = yaml.safe_load(dump_recipe(validate_tree(tree, plugins, str(saved))))
    except PrefoptError:
        pass
    return flatten(tree)


def changed_keys(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The flat keys whose values differ, in order. A key on one side only is a change, reported at the
    section the other side leaves unset when there is one (``model.lora`` for ``model.lora.r``)."""
    changed = []
    for key in sorted(before.keys() | now.keys()):
        if key in before and key in now:
            if before[key] != now[key]:
                changed.append(key)
            continue
        other = now if key in before else before
        sections = [".".join(key.split(".")[:depth]) for depth in range(1, key.count(".") + 1)]
        changed.append(next((section for section in sections if section in other), key))
    return list(dict.fromkeys(changed))


def _inside(key: str, section: str) -> bool:
    return key == section or key.startswith(section + ".")


def _covered(key: str, patterns) -> bool:
    """Whether ``key`` is one of ``patterns`` or inside a section they name."""
    return any(_inside(key, pattern) for pattern in patterns)


def _check_allowed_keys(allowed: list[str], keys) -> None:
    """Every entry of ``train.allow_changed`` names a key or section of the recipe (or a key inside a section
    one side leaves unset)."""
    for entry in allowed:
        if not any(_inside(key, entry) or _inside(entry, key) for key in keys):
            raise PrefoptError(
                f"train.allow_changed: {entry!r} is no key or section of the recipe"
                f"{did_you_mean(entry, sorted(keys))}; write dotted keys such as train.learning_rate"
            )


def _difference(key: str, before: dict[str, Any], now: dict[str, Any]) -> str:
    def value(flat: dict[str, Any]) -> str:
        inside = {k: v for k, v in flat.items() if _inside(k, key)}
        if not inside:
            return "unset"
        return repr(inside[key]) if key in inside else "set"

    return f"{key} is {value(before)} there, {value(now)} now"
