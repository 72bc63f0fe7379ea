"""Early stopping (``eval.early_stopping``): end a run whose metric has stopped improving.

At every evaluation during training (each ``train.eval_every`` steps) the metric is read from what that step
logged, its held-out metrics and its training metrics. A value better than the best so far by more than
``min_delta`` is the new best; otherwise the evaluation counts as one without improvement, and after
``patience`` of them in a row the run stops and finishes as a run that reached its last step does: final
evaluation, checkpoint, model, ``summary.json`` (with ``stopped_early``). The baseline before training
(``eval.at_start``) is not a check: the count starts with training.

The state (best value, its step, evaluations without improvement, the last step checked) is kept in every
checkpoint, so a resumed run stops where the uninterrupted one would. Rerunning a stopped run resumes its last
checkpoint, finds the patience spent and finishes again without training; a larger ``patience`` (an ``eval``
key may change on resume) lets it train on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from prefopt.errors import PrefoptError, did_you_mean


@dataclass
class EarlyStopping:
    """The rule of ``eval.early_stopping`` and where the run stands with it."""

    metric: str
    mode: str  # "min" or "max"
    patience: int
    min_delta: float
    best: float | None = None
    best_step: int | None = None
    without_improvement: int = 0  # evaluations in a row since the best
    last_checked: int | None = None  # the step of the last check

    @classmethod
    def from_recipe(cls, recipe) -> "EarlyStopping | None":
        config = recipe.eval.early_stopping
        if config is None:
            return None
        return cls(config.metric, config.mode, config.patience, config.min_delta)

    @property
    def spent(self) -> bool:
        """Whether the patience is used up: the run stops (or, resumed, does not train on)."""
        return self.without_improvement >= self.patience

    def check(self, step: int, logged: dict[str, float]) -> bool:
        """Count the evaluation at ``step`` whose logged values are ``logged``; True when the run should stop.
        A metric the run does not log is a one-line error naming the keys it does."""
        if self.metric not in logged:
            raise missing_metric(self.metric, logged)
        value = float(logged[self.metric])
        if self._improves(value):
            self.best, self.best_step, self.without_improvement = value, step, 0
        else:
            self.without_improvement += 1
        self.last_checked = step
        return self.spent

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return not math.isnan(value)  # a NaN never becomes the best, so it never hides a real one
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def record(self, step: int) -> dict[str, Any]:
        """``summary.json``'s ``stopped_early``."""
        return {"step": step, "metric": self.metric, "best": self.best, "best_step": self.best_step}

    def describe(self, step: int) -> str:
        best = "no value" if self.best is None else f"best {self.best:.6g} at step {self.best_step}"
        return (f"early stopping at step {step}: {self.metric} has not improved by more than {self.min_delta:g} "
                f"in {self.without_improvement} evaluations ({best})")

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON): the rule's metric and mode with the counts made under them."""
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_step": self.best_step,
                "without_improvement": self.without_improvement, "last_checked": self.last_checked}

    def load_state_dict(self, state: dict[str, Any] | None, say: Callable[[str], None]) -> None:
        """The counts a checkpoint kept. Counts made for another metric or mode (``eval`` may change on resume)
        do not apply: the count starts again, with a note; a new ``patience`` or ``min_delta`` applies to them."""
        if not state:
            return
        if (state.get("metric"), state.get("mode")) != (self.metric, self.mode):
            say(f"eval.early_stopping: the checkpoint counted {state.get('metric')} ({state.get('mode')}); "
                f"counting {self.metric} ({self.mode}) from here")
            return
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.without_improvement = int(state.get("without_improvement", 0))
        self.last_checked = state.get("last_checked")


def missing_metric(metric: str, logged: dict[str, float]) -> PrefoptError:
    keys = sorted(logged)
    return PrefoptError(
        f"eval.early_stopping.metric: {metric!r} is not logged at evaluations{did_you_mean(metric, keys)}; the "
        f"keys logged are {', '.join(keys) if keys else 'none (no held-out pairs were scored)'}"
    )
