"""The task contract: a source of preference data plus an evaluator of trained models.

A task builds its dataset once (deterministically for a seed, cached on disk) and can score a policy
on its held-out prompts with a ground-truth reward. A task that samples supplies only the pieces of its
evaluation, and the core's judged evaluation (``prefopt.judged.judge_completions``) does the rest, so a
task's numbers and a bench's on the user's own data come from one code path:

- ``eval_prompts``: the held-out prompts, in order;
- ``score``: the ground-truth reward of one completion;
- ``eval_sampling``: how its evaluation samples (completions per prompt, seed, batch size, temperature, ...).

``evaluate`` is then ``judge_completions`` on those three (the sentiment task's is). Benchmarks evaluate a
task that has ``eval_prompts`` and ``score`` through the same path, with the run's reference model (for the
KL of the policy's samples to it), the bench's ``EvalOptions`` (how much to sample, the same for every
entry) and the bench's judge when it names one; a task with only ``evaluate`` (written before these pieces
existed) is called through it, and its reward and length are read under the keys the task names in
``reward_metric`` and ``length_metric``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Sequence, Union

from prefopt.api.plugin import Plugin, PluginConfig

if TYPE_CHECKING:
    from prefopt.judged.evaluate import JudgedOptions

__all__ = ["KL_METRIC", "EvalOptions", "Task", "TaskConfig", "TaskContext", "TaskData", "completion_logps"]

# The key under which ``Task.evaluate`` returns the KL estimate when it is given a reference model.
KL_METRIC = "kl/sequence_mean"

Text = Union[str, list]  # a prompt: plain text, or chat messages [{"role": ..., "content": ...}]


class TaskConfig(PluginConfig):
    """Base of every task's options (recipe key ``data.task``). Unknown keys are errors."""


@dataclass(frozen=True)
class TaskContext:
    """What the engine hands a task. ``load_model`` is called only when the task must generate."""

    model_id: str  # the policy's initial weights (a local directory); part of the data's cache key
    tokenizer: object  # a transformers tokenizer
    load_model: Callable[[], object]  # returns the policy's initial model, in eval mode, on CPU
    cache_dir: Path  # where the task may keep what it builds
    seed: int
    show_progress: bool = True


@dataclass(frozen=True)
class TaskData:
    """Files in the standard preference format (JSON lines with prompt, chosen, rejected), and the file
    ``Task.evaluate`` samples its held-out prompts from when that is not ``eval``."""

    train: Path
    eval: Path
    # What the task's reward is scored on. Benchmarks compare rewards only between runs scored on the same
    # file; held-out pairs whose labels differ (another labeller, say) share their prompts.
    scored: Path | None = None

    @property
    def scored_file(self) -> Path:
        return self.scored if self.scored is not None else self.eval


@dataclass(frozen=True)
class EvalOptions:
    """How much ``Task.evaluate`` samples; None keeps the task's own setting. A benchmark passes the same
    options for every entry, so all of them are scored on the same prompts with the same budget."""

    num_prompts: int | None = None  # the first N held-out prompts
    samples_per_prompt: int | None = None  # completions sampled per prompt
    max_new_tokens: int | None = None  # length limit of each completion


class Task(Plugin):
    """Base class of task plugins. Subclasses set ``name``, ``Config`` and a docstring whose first line
    is the summary ``prefopt list`` shows."""

    Config: ClassVar[type[TaskConfig]]
    # Keys of evaluate()'s result holding the mean ground-truth reward and the mean completion length in
    # tokens; benchmarks rank by the reward. None: the task reports no such metric.
    reward_metric: ClassVar[str | None] = None
    length_metric: ClassVar[str | None] = None

    def __init__(self, config: TaskConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def build(self, ctx: TaskContext) -> TaskData:
        """Build (or find in ``ctx.cache_dir``) the train and held-out preference files."""

    def evaluate(
        self, model, tokenizer, data: TaskData, reference=None, options: EvalOptions | None = None
    ) -> dict[str, float]:
        """Score ``model`` on the held-out prompts of ``data``; keys are metric names. Optional.

        With ``reference`` (a model sharing the tokenizer), a task that samples also returns ``KL_METRIC``:
        the mean over samples y ~ model(.|x) of sum over y's tokens of log model(y|x) - log reference(y|x),
        an unbiased estimate of the sequence-level KL(model || reference) when it samples at temperature 1
        with no top-k or top-p (``completion_logps`` computes both terms). Tasks written before these
        arguments existed take only (model, tokenizer, data); callers check the signature.
        """
        return {}

    def eval_prompts(self, data: TaskData) -> list[Text] | None:
        """The task's held-out prompts in order (text, or chat messages), the ones ``evaluate`` scores: the
        completions the engine samples while training (``eval.samples``) are of the first few. Optional; None:
        the prompts of ``data.eval``'s pairs."""
        return None

    def score(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[float] | None:
        """The task's ground-truth reward of each completion (``prompts`` and ``completions`` are parallel
        lists), higher is better: the engine logs it beside each completion it samples while training, and
        judged evaluation scores with it when no judge is named. Optional; None: the task scores no single
        completion."""
        return None

    def eval_sampling(self, data: TaskData, options: EvalOptions) -> "JudgedOptions | None":
        """How the task's evaluation samples the completions of ``eval_prompts`` (``options`` set per prompt
        and length limit when they are not None): a ``prefopt.JudgedOptions``, whose seed makes the held-out
        samples the same for every run evaluated. Optional; None: the caller's settings (a bench's ``eval``)."""
        return None


def completion_logps(
    model, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, *, batch_size: int = 16,
    chunk_size: int = 1024,
) -> list[float]:
    """Summed log-probability of each completion given its prompt under ``model``, exactly (no sampling).

    ``sequences`` holds (prompt token ids, completion token ids) pairs; the completion's tokens are scored,
    an EOS it ends with included (the decision to stop is part of the sample). Computed by
    ``prefopt.forward.logprobs.sequence_logps``, so the output head is applied in chunks, never to the whole batch.
    """
    import torch

    from prefopt.forward.batching import PreferenceBatch, pad_sequences
    from prefopt.forward.logprobs import sequence_logps

    sums: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        input_ids, attention_mask, response_mask = pad_sequences(chunk, pad_id)
        # Rows are sequences, not pairs: the padded layout reads every row alike and ignores the pairing.
        batch = PreferenceBatch(input_ids, attention_mask, response_mask, torch.arange(len(chunk)))
        with torch.no_grad():
            sums.extend(sequence_logps(model, batch.to(model.device), chunk_size=chunk_size).sums.tolist())
    return sums
