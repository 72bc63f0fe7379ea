"""Held-out evaluation: loss and implicit-reward metrics on held-out pairs, and a task's own evaluator."""

from __future__ import annotations

import math

import torch

from prefopt.engine.distributed import sharded_params
from prefopt.engine.metrics import PairMetrics
from prefopt.engine.run import Run
from prefopt.engine.scoring import forward_pairs
from prefopt.forward.batching import collate_pairs


@torch.no_grad()
def evaluate_pairs(run: Run) -> dict[str, float]:
    """Loss and implicit-reward metrics on the held-out pairs (each process scores a shard)."""
    if run.eval_pairs is None:
        return {}
    acc = run.accelerator
    was_training = run.policy.training
    run.policy.eval()
    run.loss.train(False)
    metrics = PairMetrics()
    size = run.recipe.eval.batch_size
    indices = list(range(acc.process_index, len(run.eval_pairs), acc.num_processes))
    sharded = sharded_params(acc)
    # Under DDP the module itself: a DDP forward may broadcast buffers, a collective call that processes
    # with unequal shares would not match. Sharded weights are gathered in every forward, so there every
    # process runs as many batches as the first one, a process whose share ran out scoring pair 0 for nothing.
    model = run.policy if sharded else acc.unwrap_model(run.policy)
    share = math.ceil(len(run.eval_pairs) / acc.num_processes) if sharded else len(indices)
    for start in range(0, share, size):
        chunk = indices[start : start + size]
        batch = collate_pairs([run.eval_pairs.pairs[j] for j in chunk or [0]], chunk or [0], run.tokenizer.pad_token_id)
        with acc.autocast():
            logps, output = forward_pairs(run, batch.to(acc.device), run.eval_reference, model)
        if chunk:
            metrics.add(logps, output)
    run.policy.train(was_training)
    run.loss.train(True)
    return {f"eval/{k}": v for k, v in metrics.reduced(acc).items()}


def evaluate_task(run: Run) -> dict[str, float]:
    """The task's own evaluator (e.g. ground-truth reward of sampled completions), on the main process."""
    if run.task is None or not run.recipe.eval.task_metrics:
        return {}
    values: dict[str, float] = {}
    if run.is_main:
        model = run.accelerator.unwrap_model(run.policy)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            values = {f"eval/{k}": float(v) for k, v in run.task.evaluate(model, run.tokenizer, run.task_data).items()}
        model.train(was_training)
    run.accelerator.wait_for_everyone()
    return values
