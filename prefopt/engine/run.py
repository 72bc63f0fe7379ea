"""``Run``: everything a training run holds once ``setup`` has built it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from prefopt.api.loss import PreferenceLoss
from prefopt.api.task import Task, TaskData
from prefopt.data.types import TokenizedPairs
from prefopt.reference.setup import References


@dataclass
class Run:
    """Everything ``fit`` and ``finish`` need, built by ``setup``."""

    recipe: Any
    accelerator: Any
    run_dir: Path
    tokenizer: Any
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: PreferenceLoss
    train_pairs: TokenizedPairs
    eval_pairs: TokenizedPairs | None
    references: References | None  # None when the loss needs no reference
    task: Task | None
    task_data: TaskData | None
    start_step: int
    total_steps: int
    steps_per_epoch: int
    accumulation: int
    summary: dict = field(default_factory=dict)
    resumed_from: Path | None = None  # the checkpoint this run continues, if any
    resumed_extra: dict = field(default_factory=dict)  # that checkpoint's ``extra`` (an algorithm's state)
    # Seams for algorithm plugins that change the data while training (online variants), all optional:
    # which pairs optimizer step ``step`` takes (default: a seeded permutation of train_pairs per epoch) ...
    pairs_of_step: Callable[[int], list[int]] | None = None
    # ... work before each step (sampling a round) returning metrics to record at that step, work after it
    # (an EMA update), and the state an algorithm adds to each checkpoint: (json-able extra, tensor sets).
    before_step: Callable[["Run", int], dict[str, float]] | None = None
    after_step: Callable[["Run", int], None] | None = None
    checkpoint_state: Callable[[], tuple[dict, dict[str, dict[str, torch.Tensor]]]] | None = None

    @property
    def reference(self):
        """The training references (batch -> one SequenceLogps per reference), or None."""
        return self.references.train if self.references is not None else None

    @property
    def eval_reference(self):
        return self.references.eval if self.references is not None else None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)
