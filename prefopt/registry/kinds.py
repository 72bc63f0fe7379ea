"""The kinds of plugin, in one table that plugin loading, the recipe schema and `prefopt list` all read.

A kind is a hook that registers classes, the base class they subclass, the base of their ``Config``, the
recipe key that names one, and the field of ``Plugins`` that holds their registry. A new kind is one row
here, one hookspec (``hookspecs.py``) and one field of ``Plugins`` (``loading.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from prefopt.api.algorithm import Algorithm, AlgorithmConfig
from prefopt.api.judge import Judge, JudgeConfig
from prefopt.api.loss import LossConfig, PreferenceLoss
from prefopt.api.plugin import Plugin, PluginConfig
from prefopt.api.sampler import Sampler, SamplerConfig
from prefopt.api.task import Task, TaskConfig

__all__ = ["KINDS", "PluginKind", "kind_at"]


@dataclass(frozen=True)
class PluginKind:
    """One kind of plugin."""

    name: str  # what messages and `prefopt list` call one: "loss"
    hook: str  # the hookspec whose implementations return the classes
    base: type[Plugin]  # every class of the kind subclasses this
    config_base: type[PluginConfig]  # and its Config subclasses this
    recipe_key: str  # the recipe section that names one by its ``name``: "loss", "data.task", "algorithm.sampler"
    attribute: str  # the field of ``Plugins`` holding the kind's registry: "losses"
    # True where the recipe schema holds a union of every registered Config at ``recipe_key``, tagged by
    # ``name``; samplers and judges are options inside an algorithm's Config, which its ``check`` validates.
    in_schema: bool

    @property
    def recipe_path(self) -> tuple[str, ...]:
        return tuple(self.recipe_key.split("."))


KINDS: tuple[PluginKind, ...] = (
    PluginKind("loss", "prefopt_register_losses", PreferenceLoss, LossConfig, "loss", "losses", True),
    PluginKind("task", "prefopt_register_tasks", Task, TaskConfig, "data.task", "tasks", True),
    PluginKind("algorithm", "prefopt_register_algorithms", Algorithm, AlgorithmConfig, "algorithm", "algorithms",
               True),
    PluginKind("sampler", "prefopt_register_samplers", Sampler, SamplerConfig, "algorithm.sampler", "samplers",
               False),
    PluginKind("judge", "prefopt_register_judges", Judge, JudgeConfig, "algorithm.judge", "judges", False),
)


def kind_at(loc: tuple, *, in_schema: bool = True) -> PluginKind | None:
    """The kind whose recipe section holds the key at ``loc`` (the deepest match: ``algorithm.sampler.x`` is a
    sampler's), among the kinds in the recipe schema unless ``in_schema`` is False; None outside them all."""
    found = [k for k in KINDS if (k.in_schema or not in_schema) and loc[: len(k.recipe_path)] == k.recipe_path]
    return max(found, key=lambda k: len(k.recipe_path), default=None)
