"""What ``eval.samples`` names, checked when a recipe is validated (``prefopt validate`` and before a run loads
anything): the sampler and judge plugins exist, their options are theirs, the judge scores single completions,
and the run has held-out prompts to sample. Each problem is one line naming the recipe key."""

from __future__ import annotations

from typing import Any

from prefopt.errors import PrefoptError

__all__ = ["registered_plugin", "samples_plugins"]

Parts = tuple[type, Any]  # a plugin class and its validated Config


def registered_plugin(registry, name: str, key: str) -> type:
    """The plugin ``name`` of ``registry``; unknown: the registry's one line (did you mean) after ``key``.name."""
    try:
        return registry.get(name)
    except PrefoptError as exc:
        raise PrefoptError(f"{key}.name: {exc}") from None


def samples_plugins(recipe, plugins) -> tuple[Parts, Parts | None] | None:
    """The sampler and the judge (or None) ``eval.samples`` names, their options validated; None without it."""
    from prefopt.api.algorithm import plugin_config
    from prefopt.api.judge import ScoreJudge

    spec = recipe.eval.samples
    if spec is None:
        return None
    if recipe.data.task is None and not recipe.data.eval_split:
        raise PrefoptError("eval.samples samples held-out prompts, and this run has none: set data.eval_split (or "
                           "train on a task), or remove eval.samples")
    registered_plugin(plugins.samplers, spec.sampler.name, "eval.samples.sampler")
    sampler = plugin_config(plugins.samplers, spec.sampler, "eval.samples.sampler")
    if spec.judge is None:
        return sampler, None
    if not issubclass(registered_plugin(plugins.judges, spec.judge.name, "eval.samples.judge"), ScoreJudge):
        scoring = [info.name for info in plugins.judges.infos() if issubclass(info.cls, ScoreJudge)]
        raise PrefoptError(f"eval.samples.judge: judge {spec.judge.name!r} compares completions in pairs and gives no "
                           f"score of one completion; name a judge that scores each "
                           f"({', '.join(scoring) or 'none is installed'})")
    return sampler, plugin_config(plugins.judges, spec.judge, "eval.samples.judge")
