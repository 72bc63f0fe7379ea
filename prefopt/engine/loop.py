"""The optimizer steps: which pairs each step takes, one step's forward and backward, and ``fit``.

Batching and reduction: an optimizer step takes ``train.batch_size`` pairs (unpaired examples, for a
loss that declares ``unpaired``), split over processes and then into micro-batches of
``train.micro_batch_size``. Each micro-batch's per-pair losses are summed and divided by the step's
pair count, so the gradient is the mean over the step whatever the accumulation or the number of
processes. The order of pairs is a function of the seed and the epoch, so resuming at step N replays
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from tqdm.auto import tqdm

from prefopt.engine.distributed import accelerate_owns_state
from prefopt.engine.early_stopping import missing_metric
from prefopt.engine.evaluation import evaluate_pairs, evaluate_task
from prefopt.engine.metrics import PairMetrics
from prefopt.engine.nonfinite import loss_state_before, step_is_finite, take_nonfinite_step
from prefopt.engine.optim import learning_rate_at
from prefopt.engine.outputs import save
from prefopt.engine.records import format_metrics, record
from prefopt.engine.run import Run
from prefopt.engine.samples import log_completions
from prefopt.engine.scoring import forward_pairs
from prefopt.forward.batching import collate_pairs
from prefopt.forward.layouts import row_length
from prefopt.reference.setup import sync_due


def step_pairs(run: Run, step: int) -> list[int]:
    """The pairs of optimizer step ``step`` (all processes): the run's phase's, or the seeded plan."""
    chosen = run.phase.pairs_of_step(step)
    if chosen is not None:
        return chosen
    return planned_pairs(run.recipe.seed, len(run.train_pairs), run.recipe.train.batch_size, step)


def planned_pairs(seed: int, num_pairs: int, batch_size: int, step: int) -> list[int]:
    """The pairs of optimizer step ``step``: a seeded permutation per epoch, cut in order into full batches."""
    steps_per_epoch = num_pairs // batch_size
    epoch, k = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_pairs, generator=generator)
    return order[k * batch_size : (k + 1) * batch_size].tolist()


def process_micro_batches(run: Run, step: int) -> list[list[int]]:
    """This process's micro-batches of step ``step``.

    With ``train.group_by_length`` the step's pairs are sorted by length first, so each micro-batch holds
    pairs of similar length and little padding; the sorted micro-batches are dealt to the processes in
    turn, so every process gets as many and of similar lengths. Either way the step's set of pairs, and so
    its update, is the same.
    """
    acc, t = run.accelerator, run.recipe.train
    pairs = step_pairs(run, step)
    if not t.group_by_length:
        share = len(pairs) // acc.num_processes
        mine = pairs[acc.process_index * share : (acc.process_index + 1) * share]
        return [mine[i : i + t.micro_batch_size] for i in range(0, len(mine), t.micro_batch_size)]
    # A stable sort: ties keep the seeded order, so a resumed run forms the same micro-batches.
    by_length = sorted(pairs, key=lambda j: row_length(run.train_pairs.pairs[j], t.layout))
    micro_batches = [by_length[i : i + t.micro_batch_size] for i in range(0, len(by_length), t.micro_batch_size)]
    return micro_batches[acc.process_index :: acc.num_processes]


def learning_rate(run: Run, step: int) -> float:
    """The rate of 0-based step ``step``: a function of the step alone, so a resumed run continues the schedule."""
    return learning_rate_at(run.recipe, run.total_steps, step)


def train_step(run: Run, step: int) -> dict[str, float]:
    """One optimizer step; returns the step's metrics averaged over all its pairs. A step whose loss or gradient
    norm is not finite is not applied (``nonfinite.py``): it stops the run, or is skipped and counted."""
    acc, t = run.accelerator, run.recipe.train
    micro_batches = process_micro_batches(run, step)
    # Sum of per-pair losses over the global step, times the world size because DDP averages gradients.
    scale = acc.num_processes / t.batch_size
    lr = learning_rate(run, step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr

    loss_state = loss_state_before(run)
    metrics, tokens, started = PairMetrics(scores=run.loss.scores_sequences), 0, time.perf_counter()
    for i, indices in enumerate(micro_batches):
        batch = collate_pairs([run.train_pairs.pairs[j] for j in indices], indices, run.tokenizer.pad_token_id)
        batch = batch.to(acc.device)
        last = i == len(micro_batches) - 1
        # Gradients are all-reduced only on the last micro-batch of the step.
        sync = contextlib.nullcontext() if last else acc.no_sync(run.policy)
        with sync, acc.autocast():
            logps, output = forward_pairs(run, batch, run.reference)
            acc.backward(output.loss.sum() * scale)
        metrics.add(logps, output)
        tokens += int(batch.attention_mask.sum())

    params = [p for p in run.policy.parameters() if p.requires_grad]
    if t.max_grad_norm is not None or accelerate_owns_state(acc):
        # FSDP and DeepSpeed know the norm of the whole gradient, not of this process's shard
        grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm is not None else math.inf)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    finite = step_is_finite(run, metrics.sums["loss"], grad_norm)  # this process's sum of per-pair losses
    if finite:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if sync_due(run.recipe, step + 1):
        sync = run.recipe.reference.sync
        run.reference.following.sync(1.0 if sync.mode == "hard" else sync.alpha)

    elapsed = time.perf_counter() - started
    metrics.totals["tokens"] = tokens  # summed over processes with the metrics, in the same collective call
    values = metrics.reduced(acc)
    values.update(
        lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else math.nan, epoch=(step + 1) / run.steps_per_epoch,
        tokens_per_s=metrics.total("tokens") / elapsed, pairs_per_s=t.batch_size / elapsed,
    )
    if not finite:
        take_nonfinite_step(run, step, values, loss_state)  # stops the run, or counts the step as skipped
    else:
        run.nonfinite_in_a_row = 0
        # TRL's num_tokens: prompt and response tokens of every row trained on, padding aside, over the run (a
        # skipped step trained on none)
        run.num_tokens += int(metrics.total("tokens"))
    values["num_tokens"] = run.num_tokens
    if t.on_nonfinite == "skip_step":
        values.update(skipped=float(not finite), skipped_steps=run.skipped_steps)
    return values


def fit(run: Run, *, show_progress: bool = True) -> None:
    """The optimizer steps from ``run.start_step`` to ``run.total_steps``, evaluating every ``train.eval_every``
    steps and saving every ``train.save_every``. Early stopping (``eval.early_stopping``) ends them sooner: it
    sets ``run.total_steps`` to the step it stopped at, where ``finish`` then evaluates and saves."""
    r = run.recipe
    metrics_file = run.run_dir / "metrics.jsonl"
    if run.start_step == 0 and r.eval.at_start:
        held_out = evaluate_pairs(run)
        baseline = {**held_out, **evaluate_task(run)}
        record(run, metrics_file, 0, baseline)
        run.summary["eval_start"] = baseline
        if baseline:  # nothing to evaluate (no held-out pairs, no task): no empty line
            run.say(format_metrics("eval  step 0", baseline))
        check_metric_name(run, held_out)
    if resumed_stop(run):
        stop_early(run, run.start_step)
        return

    bar = tqdm(
        total=run.total_steps, initial=run.start_step, desc="training", unit="step",
        disable=not (show_progress and run.is_main), dynamic_ncols=True,
    )
    for step in range(run.start_step, run.total_steps):
        log_completions(run, step)  # eval.samples, when due: completions from the weights after `step` steps
        # an algorithm's phase works around each step (a plain run's phase does nothing and measures nothing)
        record(run, metrics_file, step, run.phase.before_step(run.context, step), before_step=True)
        values = train_step(run, step)
        run.phase.after_step(run.context, step)
        done = step + 1
        if done % r.train.log_every == 0 or done == run.total_steps:
            record(run, metrics_file, done, values)
        bar.update(1)
        # unpaired examples log no accuracy, and a step of one label no margin
        shown = {"loss": ("loss", ".4f"), "acc": ("rewards/accuracies", ".2f"), "margin": ("rewards/margins", ".3f")}
        bar.set_postfix({name: format(values[key], spec) for name, (key, spec) in shown.items() if key in values})
        if r.train.eval_every and done % r.train.eval_every == 0 and done != run.total_steps:
            evaluated = evaluate_pairs(run)
            stopper = run.early_stopping
            if stopper is not None and main_decides(run, stopper.check(done, {**values, **evaluated})):
                # finish evaluates these weights again, and records that evaluation at this step
                stop_early(run, done)
                break
            record(run, metrics_file, done, evaluated)
            if evaluated:
                run.say(format_metrics(f"eval  step {done}", evaluated))
        if r.train.save_every and done % r.train.save_every == 0 and done != run.total_steps:
            save(run, done)
    bar.close()


def check_metric_name(run: Run, held_out: dict[str, float]) -> None:
    """Early stopping's metric, when it is a held-out one, among the baseline's held-out metrics: a misspelt
    name fails before training rather than at the first evaluation."""
    stopper = run.early_stopping
    if stopper is not None and held_out and stopper.metric.startswith("eval/") and stopper.metric not in held_out:
        raise missing_metric(stopper.metric, held_out)


def resumed_stop(run: Run) -> bool:
    """Whether a resumed run stops before its first step: its patience was spent (a run that stopped early,
    run again), or is now, at the checkpoint's own evaluation. A finished run's last checkpoint was evaluated
    by ``finish`` but checked by nothing; a run continued past it (a larger train.max_steps) checks that
    evaluation now, as an uninterrupted run did at that step (a training metric was not kept; that check is
    left out)."""
    stopper, every, step = run.early_stopping, run.recipe.train.eval_every, run.start_step
    if stopper is None or step == 0:
        return False
    if stopper.spent:
        return True
    unchecked = stopper.last_checked is None or stopper.last_checked < step
    if every and step % every == 0 and step < run.total_steps and unchecked:
        evaluated = evaluate_pairs(run)
        return stopper.metric in evaluated and stopper.check(step, evaluated)
    return False


def main_decides(run: Run, stop: bool) -> bool:
    """The main process's decision, on every process: all of them must leave the loop at the same step, and a
    metric measured per process (tokens_per_s) can differ between them."""
    if run.accelerator.num_processes == 1:
        return stop
    from accelerate.utils import broadcast_object_list

    return bool(broadcast_object_list([stop])[0])


def stop_early(run: Run, step: int) -> None:
    """End training at ``step``: ``finish`` then evaluates, saves and reports it as the run's last step."""
    run.summary["stopped_early"] = run.early_stopping.record(step)
    run.say(run.early_stopping.describe(step))
    run.total_steps = step
