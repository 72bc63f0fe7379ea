"""A judge that scores completions with a Python reward function named in the recipe.

``algorithm.judge: {name: function, function: "package.module:callable"}``. The callable is imported when
the judge is built and called as ``fn(prompts, completions) -> list[float]``: two parallel lists, one
entry per completion, where a prompt is a string or a list of chat messages (``{"role", "content"}``
dicts) and a completion is a string. It returns one finite number per completion, higher is better.
A rule-based reward (a regex, a unit test, a sentiment lexicon) needs nothing else: the built-in
``prefopt_plugins.tasks.sentiment:completion_reward`` is the sentiment task's own VADER reward.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

from pydantic import Field, field_validator

from prefopt import JudgeConfig, JudgeContext, ScoreJudge, hookimpl
from prefopt.errors import PrefoptError, did_you_mean


class FunctionJudgeConfig(JudgeConfig):
    function: str = Field(
        ..., description="The reward function, as 'package.module:callable' (an importable module, then the "
        "name of a callable in it, dots for nested attributes); called as fn(prompts, completions) and "
        "returning one float per completion, higher is better.",
    )

    @field_validator("function")
    @classmethod
    def _module_and_name(cls, value: str) -> str:
        module, sep, name = value.partition(":")
        if not sep or not module.strip() or not name.strip() or ":" in name:
            raise ValueError(f"{value!r} is not 'package.module:callable' (a module, a colon, a function name)")
        return value


class FunctionJudge(ScoreJudge):
    """Score each completion with a Python reward function: fn(prompts, completions) -> list[float].

    ``function`` names it as ``package.module:callable``; the module must be importable where the run
    happens (installed, or on ``PYTHONPATH``). It is imported when the judge is built, so a misspelt
    name fails before any sampling. The function gets parallel lists (a prompt repeated once per
    completion) and must return as many finite numbers as it got completions; anything else is an error
    naming the function and the first bad index.
    """

    name = "function"
    Config = FunctionJudgeConfig

    def __init__(self, config: FunctionJudgeConfig, context: JudgeContext) -> None:
        super().__init__(config, context)
        self.fn = _import_callable(config.function)

    def scores(self, prompts: Sequence, completions: Sequence[str]) -> list[float]:
        where = f"algorithm.judge.function {self.config.function!r}"
        returned = self.fn(list(prompts), list(completions))
        try:
            values = list(returned)
        except TypeError:
            raise PrefoptError(
                f"{where} returned {type(returned).__name__}, not a list; it must return one float per completion"
            ) from None
        if len(values) != len(completions):
            raise PrefoptError(
                f"{where} returned {len(values)} scores for {len(completions)} completions; it must return one "
                "float per completion, in order"
            )
        scores = []
        for index, value in enumerate(values):
            try:
                score = float(value)
            except (TypeError, ValueError):
                raise PrefoptError(
                    f"{where} returned {value!r} at index {index}, not a number; it must return one float per "
                    "completion"
                ) from None
            if not math.isfinite(score):
                raise PrefoptError(
                    f"{where} returned a non-finite score ({score}) at index {index}; every score must be a "
                    "finite number"
                )
            scores.append(score)
        return scores


def _import_callable(spec: str) -> Callable:
    """The callable that ``package.module:callable`` names; a one-line error for each way that fails."""
    where = f"algorithm.judge.function {spec!r}"
    module_name, _, attribute = spec.partition(":")
    module_name, attribute = module_name.strip(), attribute.strip()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # The module itself (or its package) is missing, rather than something it imports.
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise PrefoptError(
                f"{where}: cannot import module {module_name!r} ({exc}); install it or put it on PYTHONPATH"
            ) from None
        raise PrefoptError(f"{where}: importing module {module_name!r} failed: ModuleNotFoundError: {exc}") from None
    except Exception as exc:  # the module exists but raised while importing
        raise PrefoptError(f"{where}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    target, path = module, module_name
    for part in attribute.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            raise PrefoptError(
                f"{where}: {path!r} has no attribute {part!r}{did_you_mean(part, names)}; name a function "
                "defined in that module"
            )
        target, path = getattr(target, part), f"{path}.{part}"
    if not callable(target):
        raise PrefoptError(
            f"{where}: {path!r} is a {type(target).__name__}, not a callable; name a function "
            "fn(prompts, completions) -> list[float]"
        )
    return target


@hookimpl
def prefopt_register_judges():
    return [FunctionJudge]
