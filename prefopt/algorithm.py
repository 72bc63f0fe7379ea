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

from pydantic import BaseModel, ConfigDict

__all__ = ["Algorithm", "AlgorithmConfig"]


class AlgorithmConfig(BaseModel):
    """Base of every algorithm's options (recipe section ``algorithm``). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Algorithm(abc.ABC):
    """Base class of algorithm plugins. Subclasses set ``name`` (the recipe's ``algorithm.name``),
    ``Config``, ``paper`` and a docstring whose first line is the summary ``prefopt list`` shows."""

    name: ClassVar[str]
    Config: ClassVar[type[AlgorithmConfig]]
    paper: ClassVar[str] = ""

    def __init__(self, config: AlgorithmConfig) -> None:
        self.config = config

    def check(self, recipe: Any) -> None:
        """Refuse recipe settings this algorithm cannot honour (raise ``PrefoptError``); called when a recipe
        is validated, so ``prefopt validate`` reports them."""

    @abc.abstractmethod
    def run(self, recipe: Any, plugins: Any, *, show_progress: bool = True) -> dict:
        """Train as the recipe says; return the run summary (also written to ``<output.dir>/summary.json``)."""

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
