"""Every registered loss, through the real engine: one optimizer step raises the chosen-minus-rejected margin.

The margin is measured on the step's own batch before and after the step, as policy log-ratios
(pc - rc) - (pr - rr), or pc - pr for a loss without a reference (for a reward model, the score margin). This catches sign errors and losses
the engine does not wire up (a missing input, a detached output) that value tests cannot.
"""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_recipe, validated
from prefopt import engine
from prefopt.forward.batching import collate_pairs
from prefopt.registry.loading import default_plugins

LOSSES = default_plugins().losses.names()

# Options that differ from a loss's defaults here, each with its reason.
OPTIONS = {
    # DiscoPOP's discovered objective is not monotone near zero margin: with the paper's tau = 0.05 its slope at
    # margin 0 (where every run starts, policy == reference) is (1 - log 2)/(4 tau) - 3/4 = +0.78, so the first
    # step lowers the margin, as in TRL and the official code (tests/losses/test_discopop.py pins that). Above
    # tau = (1 - log 2)/3 = 0.102 the slope is negative and the usual direction of learning holds.
    "discopop": {"tau": 0.2},
    # A mixture names what it mixes; MPO's mixture (arXiv:2411.10442): DPO + BCO + NLL.
    "mix": {"components": [{"name": "dpo", "weight": 0.8}, {"name": "bco_pair", "weight": 0.2}, {"name": "nll"}]},
}


def _mean_margin(run, indices) -> float:
    batch = collate_pairs([run.train_pairs.pairs[i] for i in indices], indices, run.tokenizer.pad_token_id)
    with torch.no_grad():
        logps, _ = engine.forward_pairs(run, batch, run.reference)
    if logps.labels is not None:
        # Unpaired examples: each "rejected" is a mismatched completion (a KL sample), not a worse response;
        # the margin is between desirable and undesirable examples' log-ratios (rewards/margins / beta).
        ratio, desirable = logps.policy_chosen - logps.ref_chosen, logps.labels
        return float(ratio[desirable].mean() - ratio[~desirable].mean())
    margin = logps.policy_chosen - logps.policy_rejected
    if logps.ref_chosen is not None:
        margin = margin - (logps.ref_chosen - logps.ref_rejected)
    return float(margin.mean())


@pytest.mark.parametrize("name", LOSSES)
def test_one_step_raises_the_margin(name, tiny_model_dir, pairs_file, tmp_path):
    tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / name,
                       train={"batch_size": 4, "micro_batch_size": 4, "learning_rate": 1e-3, "max_steps": 1})
    tree["loss"] = {"name": name, **OPTIONS.get(name, {})}  # each loss with its own defaults
    if default_plugins().losses.get(name).scores_sequences:
        # a reward model scores prompt + response as written, the sequence the reward_model judge scores
        tree["data"]["append_eos"] = False
    if default_plugins().losses.get(name).multi_reference:
        # a second reference equal to the first: the margin measured against the primary one is the loss's
        tree["reference"] = {"extra": [str(tiny_model_dir)]}
    run = engine.setup(validated(tree), show_progress=False)
    indices = engine.step_pairs(run, 0)
    before = _mean_margin(run, indices)
    values = engine.train_step(run, 0)
    after = _mean_margin(run, indices)
    assert torch.isfinite(torch.tensor(values["loss"]))
    assert after > before + 1e-3, f"{name}: margin {before:.4f} -> {after:.4f}"
