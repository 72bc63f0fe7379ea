"""Callbacks: code of the caller's own that ``prefopt.train`` runs for every metrics record a run writes.

A callback subclasses ``prefopt.Callback`` (or is any object with some of its methods) and overrides what
it needs. They run on the main process, in the training loop, right after the record is appended to
``metrics.jsonl``; an exception raised in one stops the run there and reaches ``train``'s caller
unchanged (the run resumes from its newest checkpoint when trained again).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Sequence

__all__ = ["Callback", "active_callbacks", "notify_record"]

EVAL_PREFIX = "eval/"  # every held-out metric's key starts with it (prefopt.engine.evaluation)

_active: ContextVar[tuple[Any, ...]] = ContextVar("prefopt_callbacks", default=())


class Callback:
    """Override any of these; the base class does nothing.

    ``on_step(step, metrics)``: a training record: ``loss``, ``rewards/accuracies``, ``lr``, ... after optimizer
    step ``step`` (every ``train.log_every`` steps), and what an algorithm measured before a step (a round's
    sampling; those records hold no ``loss``).
    ``on_evaluate(step, metrics)``: held-out metrics (keys ``eval/...``) at ``step``: 0 for the baseline, then
    every ``train.eval_every`` steps and at the end.
    ``on_train_end(result)``: the run finished; ``result`` is the ``TrainResult`` that ``train`` returns.
    """

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_train_end(self, result: Any) -> None:
        pass


@contextmanager
def active_callbacks(callbacks: Sequence[Any]) -> Iterator[None]:
    """Call ``callbacks`` for every record written inside the ``with`` block (this thread only)."""
    token = _active.set((*_active.get(), *callbacks))
    try:
        yield
    finally:
        _active.reset(token)


def notify_record(step: int, values: dict[str, float]) -> None:
    """Hand one metrics record to the active callbacks: held-out metrics to ``on_evaluate``, the rest to
    ``on_step``. Called by the engine on the main process after the record is written."""
    callbacks = _active.get()
    if not callbacks:
        return
    is_eval = all(key.startswith(EVAL_PREFIX) for key in values)
    method = "on_evaluate" if is_eval else "on_step"
    for callback in callbacks:
        handler = getattr(callback, method, None)
        if handler is not None:
            handler(step, dict(values))  # a copy: a callback that edits it changes nothing else
