"""Held-out evaluation: loss and implicit-reward metrics on held-out pairs, and a task's own evaluator.

The held-out split (``data.eval_split``, or a task's held-out file) logs ``eval/<metric>``; each named eval set
(``eval.sets``) logs ``eval/<name>/<metric>``, scored with its own reference exactly as the held-out split is.
Beside the training metrics, an evaluation logs the policy's ``logits/chosen``, ``logits/rejected`` and
``entropy`` (TRL's names; ``prefopt.engine.metrics``); a reward model has no next-token distribution, so not it.
Training does not: they take two more passes over each chunk of logits, which made a training step 5-47% slower
on the tests' tiny models and about 24% on SmolLM2-135M (CPU), while evaluation has no backward and runs only
every ``train.eval_every`` steps.
"""

from __future__ import annotations

import math

import torch

from prefopt.data.types import TokenizedPairs
from prefopt.engine.distributed import sharded_params
from prefopt.engine.metrics import PairMetrics
from prefopt.engine.run import Run
from prefopt.engine.scoring import score_pairs
from prefopt.forward.batching import collate_pairs


@torch.no_grad()
def evaluate_pairs(run: Run) -> dict[str, float]:
    """Loss, implicit-reward and token metrics on the held-out pairs (``eval/...``) and on each named eval set
    (``eval/<name>/...``); each process scores a shard of each."""
    splits = [("eval/", run.eval_pairs, run.eval_reference)]
    references = run.references.eval_sets if run.references is not None else {}
    splits += [(f"eval/{name}/", pairs, references.get(name)) for name, pairs in run.eval_sets.items()]
    if all(pairs is None for _, pairs, _ in splits):
        return {}
    was_training = run.policy.training
    run.policy.eval()
    run.loss.train(False)
    values: dict[str, float] = {}
    try:
        for prefix, pairs, reference in splits:
            if pairs is not None:
                values.update({prefix + k: v for k, v in score_split(run, pairs, reference).items()})
    finally:
        run.policy.train(was_training)
        run.loss.train(True)
    return values


def score_split(run: Run, pairs: TokenizedPairs, reference) -> dict[str, float]:
    """The metrics of ``pairs`` under the policy and ``reference``, reduced over every process's shard."""
    acc = run.accelerator
    metrics = PairMetrics(scores=run.loss.scores_sequences)
    size = run.recipe.eval.batch_size
    indices = list(range(acc.process_index, len(pairs), acc.num_processes))
    sharded = sharded_params(acc)
    # Under DDP the module itself: a DDP forward may broadcast buffers, a collective call that processes
    # with unequal shares would not match. Sharded weights are gathered in every forward, so there every
    # process runs as many batches as the first one, a process whose share ran out scoring pair 0 for nothing.
    model = run.policy if sharded else acc.unwrap_model(run.policy)
    share = math.ceil(len(pairs) / acc.num_processes) if sharded else len(indices)
    for start in range(0, share, size):
        chunk = indices[start : start + size]
        batch = collate_pairs([pairs.pairs[j] for j in chunk or [0]], chunk or [0], run.tokenizer.pad_token_id)
        batch = batch.to(acc.device)
        with acc.autocast():
            policy, logps, output = score_pairs(run, batch, reference, model, token_stats=True)
        if chunk:
            metrics.add(logps, output)
            if policy.entropy_sums is not None:  # a reward model has no next-token distribution to describe
                metrics.add_token_stats(policy, batch.labels)
    return metrics.reduced(acc)


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
