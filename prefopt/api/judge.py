"""The judge contract: a plugin that says which of a prompt's completions is better.

Two kinds, one interface for algorithms (``pick``):

- a ``ScoreJudge`` gives every completion a number (a reward model, a Python reward function); the best
  and the worst completion of a prompt form its pair;
- a ``PairwiseJudge`` says, for two completions of one prompt, how likely the first is the better one (an
  LLM judge, PairRM); with more than two completions each is compared with every other, and the one that
  wins most comparisons is chosen, the one that wins fewest rejected.

A prompt whose best and worst tie (within ``min_margin``) gives no pair: it carries no preference.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from itertools import combinations
from typing import ClassVar, Sequence, Union

from pydantic import Field

from prefopt.api.plugin import Plugin, PluginConfig

__all__ = ["Choice", "Judge", "JudgeConfig", "JudgeContext", "PairwiseJudge", "ScoreJudge", "drop_models"]

Text = Union[str, list]  # a prompt: plain text, or chat messages [{"role": ..., "content": ...}]


class JudgeConfig(PluginConfig):
    """Options every judge has (recipe key ``algorithm.judge``); judges add their own. Unknown keys are errors."""

    min_margin: float = Field(
        0.0, ge=0, description="A prompt gives a pair only if its best completion beats its worst by more than "
        "this (scores, or win counts for a pairwise judge); ties never do.",
    )


@dataclass(frozen=True)
class JudgeContext:
    """What an online algorithm hands a judge when it builds it."""

    device: str = "cpu"
    seed: int = 0


@dataclass(frozen=True)
class Choice:
    """The pair a judge picked among one prompt's completions."""

    chosen: int  # index of the chosen completion
    rejected: int  # index of the rejected completion
    scores: tuple[float, ...]  # every completion's score (a pairwise judge: its number of wins)

    @property
    def margin(self) -> float:
        return self.scores[self.chosen] - self.scores[self.rejected]


class Judge(Plugin):
    """Base class of judge plugins; subclass ``ScoreJudge`` or ``PairwiseJudge``. Subclasses set ``name``
    (recipe key ``algorithm.judge.name``), ``Config`` and a docstring whose first line ``prefopt list`` shows."""

    Config: ClassVar[type[JudgeConfig]] = JudgeConfig

    def __init__(self, config: JudgeConfig, context: JudgeContext) -> None:
        self.config = config
        self.context = context

    @abc.abstractmethod
    def pick(self, prompts: Sequence[Text], completions: Sequence[Sequence[str]]) -> list[Choice | None]:
        """For each prompt, the (chosen, rejected) pair among its completions, or None when they tie."""

    def close(self) -> None:
        """Free what the judge holds (a reward model)."""


class ScoreJudge(Judge):
    """A judge that scores each completion on its own; subclasses implement ``scores``."""

    @abc.abstractmethod
    def scores(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[float]:
        """One score per (prompt, completion), higher is better; the two lists are parallel."""

    def pick(self, prompts: Sequence[Text], completions: Sequence[Sequence[str]]) -> list[Choice | None]:
        flat_prompts = [p for p, group in zip(prompts, completions) for _ in group]
        flat = self.scores(flat_prompts, [c for group in completions for c in group])
        if len(flat) != len(flat_prompts):
            raise ValueError(f"judge {self.name!r} returned {len(flat)} scores for {len(flat_prompts)} completions")
        choices, start = [], 0
        for group in completions:
            scores = tuple(float(s) for s in flat[start : start + len(group)])
            start += len(group)
            choices.append(_best_and_worst(scores, self.config.min_margin))
        return choices


class PairwiseJudge(Judge):
    """A judge that compares two completions of a prompt; subclasses implement ``prefer``."""

    @abc.abstractmethod
    def prefer(self, prompts: Sequence[Text], first: Sequence[str], second: Sequence[str]) -> list[float]:
        """For each (prompt, first, second), the probability that ``first`` is the better completion."""

    def pick(self, prompts: Sequence[Text], completions: Sequence[Sequence[str]]) -> list[Choice | None]:
        # Every unordered pair of each prompt's completions, judged in one call.
        asked = [(i, a, b) for i, group in enumerate(completions) for a, b in combinations(range(len(group)), 2)]
        probabilities = self.prefer(
            [prompts[i] for i, _, _ in asked], [completions[i][a] for i, a, _ in asked],
            [completions[i][b] for i, _, b in asked],
        )
        if len(probabilities) != len(asked):
            raise ValueError(f"judge {self.name!r} returned {len(probabilities)} preferences for {len(asked)} pairs")
        wins = [[0.0] * len(group) for group in completions]
        for (i, a, b), p in zip(asked, probabilities):
            # A win counts one; an even call (p = 0.5) half to each.
            wins[i][a] += 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0
            wins[i][b] += 1.0 if p < 0.5 else 0.5 if p == 0.5 else 0.0
        return [_best_and_worst(tuple(w), self.config.min_margin) for w in wins]


def _best_and_worst(scores: tuple[float, ...], min_margin: float) -> Choice | None:
    """The first best and the first worst completion (ties broken by sampling order), or None if they tie."""
    if len(scores) < 2:
        return None
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    if scores[best] - scores[worst] <= min_margin:
        return None
    return Choice(best, worst, scores)


# ----------------------------------------------------------------------------------------------------------
# helpers for judges that run a model (they pad token ids with ``prefopt.pad_token_ids``)


def drop_models(owner, *attributes: str) -> None:
    """Set ``owner``'s ``attributes`` (a model, its tokenizer) to None, collect them, and where a model was on
    CUDA return the cached memory to the device: what a judge's ``close()`` does."""
    import gc

    import torch

    on_cuda = False
    for attribute in attributes:
        value = getattr(owner, attribute)
        if isinstance(value, torch.nn.Module):
            on_cuda |= any(p.is_cuda for p in value.parameters())
        setattr(owner, attribute, None)
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
