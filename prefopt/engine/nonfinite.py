"""The non-finite guard: a step whose loss or gradient norm is inf or NaN never changes the weights.

``train.on_nonfinite: stop`` (the default) ends the run with ``NonFiniteError`` (exit status 3), naming the
step and the newest checkpoint. ``skip_step`` drops the step's gradients instead: no optimizer step (Adam's
moments and step count stay as they were), the loss plugin's running state put back as it was before the
step, and the step counted in ``skipped_steps`` (its metrics line, summary.json and every checkpoint, so a
resumed run goes on counting); ``train.max_nonfinite_in_a_row`` such steps in a row stop the run too. The
learning rate is a function of the step alone, so a skipped step leaves no schedule state behind, and the
random-generator state it used is in the next checkpoint: a resumed run skips the same steps.

Every process takes the same decision: each one's flag is summed over the processes, one small collective
call per step. Under fp16 autocast, the loss scaler (accelerate's or DeepSpeed's) already skips a step whose
scaled gradients overflow and lowers the scale; that is calibration, not divergence, so only the loss is
checked there.

A checkpoint is never written from non-finite weights (``check_finite_weights``), so the newest checkpoint
is always one training can resume from, and rotation can never delete the last finite one.
"""

from __future__ import annotations

import copy
import math

import torch

from prefopt.engine import checkpoint as ckpt
from prefopt.engine.run import Run
from prefopt.errors import NonFiniteError

__all__ = ["check_finite_weights", "loss_state_before", "step_is_finite", "take_nonfinite_step"]

# How to go on from a stopped run: the resume guard refuses a changed learning rate unless it is allowed.
_FIX = ("to resume from it, lower train.learning_rate (or change the loss's options) and rerun with --allow-changed "
        "train.learning_rate (the keys you changed)")


def step_is_finite(run: Run, loss_sum: float, grad_norm) -> bool:
    """Whether this step's loss (``loss_sum``: this process's sum over its pairs) and gradient norm are finite
    on every process."""
    acc = run.accelerator
    bad = not math.isfinite(loss_sum)
    # fp16: the loss scaler (accelerate's, or DeepSpeed's) handles overflowing gradients itself
    if run.recipe.train.mixed_precision != "fp16" and grad_norm is not None:
        bad = bad or not math.isfinite(float(grad_norm))  # a CPU-GPU sync point, once per step
    if acc.num_processes == 1:
        return not bad
    flag = acc.reduce(torch.tensor([float(bad)], device=acc.device), reduction="sum")
    return float(flag.item()) == 0


def loss_state_before(run: Run) -> dict | None:
    """The loss plugin's running state before a step, to put back if the step is skipped (skip_step only: a NaN
    in a running average would make every later step non-finite)."""
    return copy.deepcopy(run.loss.state_dict()) if run.recipe.train.on_nonfinite == "skip_step" else None


def take_nonfinite_step(run: Run, step: int, values: dict[str, float], loss_state: dict | None) -> None:
    """Act on a non-finite step (0-based ``step``) whose gradients were not applied: stop, or count it as
    skipped and go on until too many come in a row."""
    t, done = run.recipe.train, step + 1
    what = f"loss {values.get('loss', math.nan):.4g}, gradient norm {values.get('grad_norm', math.nan):.4g}"
    if t.on_nonfinite == "stop":
        raise NonFiniteError(
            f"step {done} of {run.run_dir} gave a non-finite loss or gradient ({what}); stopped without applying "
            f"it (train.on_nonfinite=stop); {newest_checkpoint(run, done)}; {_FIX}, or set train.on_nonfinite=skip_step"
        )
    run.loss.load_state_dict(loss_state)
    run.skipped_steps += 1
    run.nonfinite_in_a_row += 1
    if run.nonfinite_in_a_row >= t.max_nonfinite_in_a_row:
        first = done - run.nonfinite_in_a_row + 1
        steps = f"steps {first}-{done}" if first < done else f"step {done}"
        raise NonFiniteError(
            f"{steps} of {run.run_dir} gave a non-finite loss or gradient (the last: {what}); stopped after "
            f"train.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row} in a row; {newest_checkpoint(run, done)}; {_FIX}"
        )
    run.say(f"step {done}: non-finite loss or gradient ({what}); update skipped "
            f"({run.nonfinite_in_a_row} in a row, {run.skipped_steps} in all)")


def check_finite_weights(run: Run, step: int) -> None:
    """Refuse to checkpoint step ``step`` when the trainable weights hold inf or NaN (an update with finite
    gradients can still overflow them), so every checkpoint on disk is one training can resume from."""
    acc = run.accelerator
    params = [p for p in run.policy.parameters() if p.requires_grad]
    bad = torch.zeros(1, device=acc.device)
    for p in params:  # this process's parameters, or its shard of them under FSDP and DeepSpeed
        if p.numel() and not bool(torch.isfinite(p.detach()).all()):
            bad += 1
            break
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    if float(bad.item()):
        raise NonFiniteError(
            f"step {step} of {run.run_dir}: the weights hold inf or NaN after the update, so no checkpoint was "
            f"written; {newest_checkpoint(run, step)}; {_FIX}"
        )


def newest_checkpoint(run: Run, step: int) -> str:
    """The newest checkpoint before step ``step``, named for a message: every one prefopt writes holds finite
    weights (a newer folder can only be a damaged one the run fell back from)."""
    found = [found for found in ckpt.checkpoints(run.run_dir) if found[0] < step]
    if not found:
        return "no checkpoint was written before it (train.save_every sets how often)"
    return f"the newest checkpoint is {found[-1][1]} (finite weights)"
