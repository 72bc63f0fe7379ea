"""The ground-truth reward: VADER's compound sentiment score (Hutto & Gilbert 2014)."""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from prefopt.errors import PrefoptError


@lru_cache(maxsize=1)
def analyzer():
    """VADER's analyzer; it reads its lexicon from disk, so it is built once per process."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ModuleNotFoundError:
        raise PrefoptError("the sentiment task scores text with VADER, and vaderSentiment is not installed: "
                           "pip install 'prefopt[embedded]'") from None  # fmt: skip
    return SentimentIntensityAnalyzer()


def vader_reward(texts: Sequence[str]) -> list[float]:
    """VADER compound sentiment of each text, in [-1, 1] (positive is better)."""
    scorer = analyzer()
    return [scorer.polarity_scores(text)["compound"] for text in texts]


def completion_reward(prompts: Sequence, completions: Sequence[str]) -> list[float]:
    """The task's reward as a judge's reward function: VADER compound score of each completion alone.

    For ``algorithm.judge: {name: function, function: "prefopt_plugins.tasks.sentiment:completion_reward"}``.
    ``prompts`` (parallel to ``completions``) are ignored on purpose: the task's ground-truth reward, which
    labels its pairs and scores ``evaluate``'s samples, scores the continuation alone, since every
    completion of a prompt shares the prompt and only the continuation is the policy's doing. So a judge
    using this function ranks completions exactly as the task's own pairs and evaluation do.
    """
    return vader_reward(completions)
