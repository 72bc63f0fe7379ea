"""``Run``: everything a training run holds once ``setup`` has built it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prefopt.api.algorithm import Phase, PhaseContext
from prefopt.api.loss import PreferenceLoss
from prefopt.api.task import Task, TaskData
from prefopt.data.types import TokenizedPairs
from prefopt.reference.setup import References


@dataclass
class Run:
    """Everything ``fit`` and ``finish`` need, built by ``setup``. An algorithm never assigns its fields: its
    ``phase`` (the plain ``Phase()`` when there is none) acts through ``context``."""

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
    train_rows: Any = None  # the source rows the training pairs' ``row`` numbers index
    phase: Phase = field(default_factory=Phase)  # what an algorithm changes in this run; hooks the loop calls
    # train.on_nonfinite=skip_step's counts (nonfinite.py), kept in every checkpoint
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    eval_sets: dict[str, TokenizedPairs] = field(default_factory=dict)  # eval.sets, by name (no prompt-only ones)
    # kept in every checkpoint: tokens of the applied steps (num_tokens), eval.early_stopping's counts
    num_tokens: int = 0
    early_stopping: Any = None  # prefopt.engine.early_stopping.EarlyStopping, when the recipe asks for it
    completions: Any = None  # eval.samples: what samples and scores completions while training (samples.py)

    @cached_property
    def context(self) -> PhaseContext:
        """The view of this run that the phase's hooks are handed."""
        return PhaseContext(self)

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
