"""Length grouping: each step's pairs sorted by length before they are cut into micro-batches. Less padding,
the same pairs per step, and so the same loss and gradient."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from helpers import tiny_recipe, validated
from prefopt import Phase, engine
from prefopt.forward.batching import collate_pairs
from prefopt.data.types import TokenizedPair, TokenizedPairs


def _varied_pairs(n: int) -> TokenizedPairs:
    rng = random.Random(0)
    ids = lambda k: tuple(rng.randrange(3, 100) for _ in range(k))  # noqa: E731
    pairs = [TokenizedPair(i, ids(rng.randint(2, 40)), ids(rng.randint(1, 30)), ids(rng.randint(1, 30)))
             for i in range(n)]
    return TokenizedPairs("synthetic", pairs)


def _run(pairs: TokenizedPairs, *, group: bool, processes: int, rank: int, layout: str = "padded"):
    """What ``process_micro_batches`` reads of a run: no model needed."""
    train = SimpleNamespace(batch_size=16, micro_batch_size=2, group_by_length=group, layout=layout)
    return SimpleNamespace(
        recipe=SimpleNamespace(seed=0, train=train), train_pairs=pairs, steps_per_epoch=len(pairs) // 16,
        phase=Phase(),
        accelerator=SimpleNamespace(num_processes=processes, process_index=rank),
    )


def _padding(pairs: TokenizedPairs, micro_batches: list[list[int]]) -> int:
    total = 0
    for indices in micro_batches:
        batch = collate_pairs([pairs.pairs[j] for j in indices], indices, pad_id=0)
        total += int((batch.attention_mask == 0).sum())
    return total


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_grouping_keeps_each_steps_pairs_and_cuts_padding(processes):
    pairs = _varied_pairs(64)
    for step in range(4):
        per_setting = {}
        for group in (False, True):
            shares = [engine.process_micro_batches(_run(pairs, group=group, processes=processes, rank=r), step)
                      for r in range(processes)]
            assert len({len(share) for share in shares}) == 1  # every process runs as many micro-batches
            assert all(len(mb) == 2 for share in shares for mb in share)
            per_setting[group] = [mb for share in shares for mb in share]
        step_pairs = engine.step_pairs(_run(pairs, group=False, processes=1, rank=0), step)
        for micro_batches in per_setting.values():
            assert sorted(j for mb in micro_batches for j in mb) == sorted(step_pairs)
        # What is left is mostly inside pairs (chosen and rejected of different lengths), which no order removes.
        assert _padding(pairs, per_setting[True]) < 0.6 * _padding(pairs, per_setting[False])


def test_grouping_follows_the_layouts_row_length():
    """Prefix-shared rows hold prompt + chosen + rejected, so that is what is sorted by."""
    shapes = [(10, 1, 30), (5, 30, 15)]  # padded widths 40 and 35; prefix-shared rows 41 and 50
    pairs = TokenizedPairs("synthetic", [
        TokenizedPair(i, (1,) * prompt, (2,) * chosen, (3,) * rejected)
        for i, (prompt, chosen, rejected) in enumerate(shapes * 8)
    ])
    padded = engine.process_micro_batches(_run(pairs, group=True, processes=1, rank=0), 0)
    shared = engine.process_micro_batches(_run(pairs, group=True, processes=1, rank=0, layout="prefix_shared"), 0)
    assert all(j % 2 == 1 for j in padded[0]) and all(j % 2 == 0 for j in padded[-1])
    assert all(j % 2 == 0 for j in shared[0]) and all(j % 2 == 1 for j in shared[-1])


def _one_step(model_dir, data, out, group: bool):
    """The step's loss, its gradient (before the optimizer uses it) and its micro-batches."""
    tree = tiny_recipe(model_dir, data, out, train={"batch_size": 8, "micro_batch_size": 2, "max_steps": 1,
                                                    "max_grad_norm": None, "group_by_length": group})
    run = engine.setup(validated(tree), show_progress=False)
    grads = {}
    run.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in run.policy.named_parameters()})
    values = engine.train_step(run, 0)
    return values, grads, engine.process_micro_batches(run, 0), run.train_pairs


def test_grouped_step_has_the_ungrouped_loss_and_gradient(tiny_model_dir, pairs_file, tmp_path):
    plain, plain_grads, plain_batches, pairs = _one_step(tiny_model_dir, pairs_file, tmp_path / "a", group=False)
    grouped, grouped_grads, grouped_batches, _ = _one_step(tiny_model_dir, pairs_file, tmp_path / "b", group=True)
    assert grouped_batches != plain_batches  # grouping did reorder this step
    assert _padding(pairs, grouped_batches) < _padding(pairs, plain_batches)
    assert grouped["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    assert grouped["grad_norm"] == pytest.approx(plain["grad_norm"], abs=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grouped_grads[name], grad, rtol=0, atol=1e-6, msg=name)
