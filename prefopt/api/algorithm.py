"""The algorithm contract: a plugin that drives several phases of training through the engine.

Without an ``algorithm`` section a recipe is one pass of the engine (``prefopt.engine.train``). An
algorithm plugin orchestrates more: stepwise DPO trains on chunks of the data in turn, each stage held
to the previous stage's model; online variants alternate sampling and training. It uses the engine's
public functions (``setup``, ``fit``, ``finish``, ``train``) on recipes it derives from the user's, and
keeps each phase's checkpoints so that a rerun continues where a crash stopped it.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from prefopt.errors import PrefoptError

__all__ = ["Algorithm", "AlgorithmConfig", "PluginSpec", "plugin_config"]


class AlgorithmConfig(BaseModel):
    """Base of every algorithm's options (recipe section ``algorithm``). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Algorithm(abc.ABC):
    """Base class of algorithm plugins. Subclasses set ``name`` (the recipe's ``algorithm.name``),
    ``Config``, ``paper`` and a docstring whose first line is the summary ``prefopt list`` shows."""

    name: ClassVar[str]
    Config: ClassVar[type[AlgorithmConfig]]
    paper: ClassVar[str] = ""
    # True for an algorithm that reads only the training data's prompts and makes every pair it trains on
    # (samples and judges responses): ``data.format: prompt_only`` passes validation, and its ``run`` must
    # pass ``pairs_from_prompts=True`` to ``engine.setup``, which otherwise refuses prompt-only data.
    pairs_from_prompts: ClassVar[bool] = False

    def __init__(self, config: AlgorithmConfig) -> None:
        self.config = config

    def check(self, recipe: Any, plugins: Any = None) -> None:
        """Refuse recipe settings this algorithm cannot honour (raise ``PrefoptError``); called when a recipe
        is validated, so ``prefopt validate`` reports them. ``plugins`` (added in 0.3; an override may leave
        it out) are the registries the recipe was validated against."""

    @abc.abstractmethod
    def run(self, recipe: Any, plugins: Any, *, show_progress: bool = True) -> dict:
        """Train as the recipe says; return the run summary (also written to ``<output.dir>/summary.json``)."""

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


class PluginSpec(BaseModel):
    """A plugin an algorithm uses, by name, with its options (e.g. ``algorithm.sampler: {name: vllm, ...}``);
    the options are checked against that plugin's own Config by ``plugin_config``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k != "name"}


def plugin_config(registry: Any, spec: PluginSpec, key: str) -> tuple[type, BaseModel]:
    """The plugin class ``spec`` names in ``registry`` and its validated Config; a bad option is a one-line
    error naming the recipe key (``key`` is where the spec sits, e.g. ``algorithm.sampler``)."""
    cls = registry.get(spec.name)
    try:
        return cls, cls.Config.model_validate(spec.options())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise PrefoptError(f"{key}.{where}: {message} (an option of {registry.kind} {spec.name!r})") from None
