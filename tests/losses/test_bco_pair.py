"""BCO, pairwise (``prefopt_plugins.losses.bco_pair``): hand-worked values, the running shift delta (training
only, saved and restored), and parity with TRL 1.16 ``"bco_pair"``.

Notation as in VARIANTS.md §0: rewards ``sc = beta * Dc``, ``sr = beta * Dr``, ``l(z) = -log sigmoid(z)``, and

    L = l(sc - delta) + l(-(sr - delta)),   delta = mean over training micro-batches of mean(sc, sr).
"""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from helpers import tiny_recipe, validated
from prefopt import engine
from prefopt.engine import checkpoint
from prefopt.registry.loading import default_plugins
from prefopt_plugins.losses.bco_pair import BCOPair
from trl_harness import (
    assert_matches_trl, pair_logps_of, prefopt_pair_logps, random_preference_batch, trl_compute_loss, trl_dpo_trainer,
)


def bco(beta: float, running_shift: bool = True) -> BCOPair:
    return BCOPair(BCOPair.Config(beta=beta, running_shift=running_shift))


# Two hand-made micro-batches of two pairs; beta = 0.5.
#   batch A: Dc = [1, 0], Dr = [-1, 1]  ->  sc = [0.5, 0], sr = [-0.5, 0.5],  mean reward 0.5 / 4 = 0.125
#   batch B: Dc = [2, 1], Dr = [0, 1]   ->  sc = [1, 0.5], sr = [0, 0.5],     mean reward 2 / 4 = 0.5
def batch_a(requires_grad=True):
    return pair_logps_of([-1.0, -2.0], [-3.0, -2.0], [-2.0, -2.0], [-2.0, -3.0], requires_grad=requires_grad)


def batch_b(requires_grad=True):
    return pair_logps_of([0.0, -1.0], [-2.0, -1.0], [-2.0, -2.0], [-2.0, -2.0], requires_grad=requires_grad)


def test_shift_and_loss_by_hand():
    """Training on A: delta = 0.125 (A's own mean, included before the loss).
    Row 0: l(0.5 - 0.125) + l(-(-0.5 - 0.125)) = l(0.375) + l(0.625)
         = 0.52312326413984 + 0.42870067827651864 = 0.9518239424163586.
    Then on B: delta = (0.125 + 0.5) / 2 = 0.3125, each micro-batch counting once.
    Rewards stay unshifted (beta * D); metrics["delta"] is the delta used.  Tolerance 1e-12."""
    loss = bco(0.5)
    out = loss(batch_a())
    assert out.metrics["delta"].item() == pytest.approx(0.125, abs=1e-12)
    assert out.loss[0].item() == pytest.approx(0.9518239424163586, abs=1e-12)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)

    assert loss(batch_b()).metrics["delta"].item() == pytest.approx(0.3125, abs=1e-12)
    assert loss.state_dict() == {"delta": 0.3125, "batches": 2}


def test_evaluation_reads_delta_without_moving_it():
    """Under torch.no_grad() (how the engine evaluates) delta is used as it stands but not updated, even for
    inputs that would carry gradient: after training on A, scoring B at eval keeps delta = 0.125 and the batch
    count at 1. Before any training step delta is 0. Log-probs without gradient (a frozen policy) do not
    update it either."""
    loss = bco(0.5)
    with torch.no_grad():
        assert loss(batch_b(requires_grad=False)).metrics["delta"].item() == 0.0
    loss(batch_a())
    with torch.no_grad():
        evaluated = loss(batch_b())
    assert evaluated.metrics["delta"].item() == pytest.approx(0.125, abs=1e-12)
    assert loss.state_dict() == {"delta": 0.125, "batches": 1}
    loss(batch_b(requires_grad=False))
    assert loss.state_dict() == {"delta": 0.125, "batches": 1}


def test_state_survives_a_checkpoint_round_trip():
    """state_dict is plain JSON (the engine writes it into state.json); a fresh loss loaded from it continues
    the same average: after A, save, load into a new loss, train on B -> delta 0.3125 as without the break."""
    first = bco(0.5)
    first(batch_a())
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = bco(0.5)
    resumed.load_state_dict(saved)
    assert resumed(batch_b()).metrics["delta"].item() == pytest.approx(0.3125, abs=1e-12)
    with pytest.raises(ValueError, match="expects state keys"):
        bco(0.5).load_state_dict({"delta": 0.1})


def test_without_running_shift_delta_is_zero_and_there_is_no_state():
    """running_shift=False (TRL >= 0.29): delta = 0 always, nothing to save, and a checkpoint that holds a
    delta is refused rather than silently ignored. Row 0 of A: l(0.5) + l(0.5) = 2 * 0.4740769841801067."""
    loss = bco(0.5, running_shift=False)
    out = loss(batch_a())
    assert out.loss[0].item() == pytest.approx(0.9481539683602134, abs=1e-12)
    assert out.metrics["delta"].item() == 0.0 and loss.state_dict() == {}
    with pytest.raises(ValueError, match="keeps no state"):
        loss.load_state_dict({"delta": 0.1, "batches": 3})


def classic_running_mean(values: list[float]) -> float:
    """TRL <= 0.28's ``RunningMoments.update`` (trl/trainer/utils.py), transcribed for the one value per call
    its ``bco_pair`` passes (the batch-mean reward, so ``xs_count = 1`` and ``xs_var = 0``); only the mean
    is used as delta."""
    mean, count = 0.0, 1e-24
    for x in values:
        delta = x - mean
        tot_count = count + 1
        mean += delta * 1 / tot_count
        count = tot_count
    return mean


def test_delta_follows_trl_classic_running_moments():
    """Over five random training micro-batches, delta equals TRL <= 0.28's running mean of the batch-mean
    rewards, fed the same values, to 1e-12."""
    loss, means = bco(0.1), []
    for seed in range(5):
        batch = random_preference_batch(4, length=12, seed=seed)
        logps, _ = prefopt_pair_logps(batch, batch.pop("per_token_logps"))
        rewards = torch.cat([0.1 * (logps.policy_chosen - logps.ref_chosen),
                             0.1 * (logps.policy_rejected - logps.ref_rejected)])
        means.append(rewards.mean().item())
        out = loss(logps)
        assert out.metrics["delta"].item() == pytest.approx(classic_running_mean(means), abs=1e-12)


def test_config_defaults_and_bounds():
    """beta 0.01 (the paper's, per the TRL index) and the running shift on by default."""
    assert BCOPair.Config().beta == 0.01 and BCOPair.Config().running_shift is True
    with pytest.raises(ValidationError, match="greater than 0"):
        BCOPair.Config(beta=0)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        BCOPair.Config(delta=0.1)


# ----------------------------------------------------------------------------------------------------------
# Parity with TRL 1.16 DPOTrainer._compute_loss


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tokenizer, tmp_path_factory):
    return trl_dpo_trainer(tiny_model_dir, tokenizer, 0.1, tmp_path_factory.mktemp("trl"), loss_type=["bco_pair"])


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_matches_trl_bco_pair_without_shift(beta, trainer):
    """running_shift=False equals TRL 1.16 ``loss_type="bco_pair"`` (delta dropped in v0.29): loss, gradient
    and rewards to 1e-6 in float64."""
    batch = random_preference_batch(8, length=12, seed=int(beta * 1000) + 5)
    per_token_logps = batch.pop("per_token_logps")
    trl = trl_compute_loss(trainer, batch, per_token_logps, beta=beta, loss_types=["bco_pair"])
    logps, leaf = prefopt_pair_logps(batch, per_token_logps)
    assert_matches_trl(bco(beta, running_shift=False)(logps), leaf, trl)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_trl_bco_pair_with_running_shift(beta, trainer):
    """With the running shift, over three training micro-batches: TRL 1.16 computes l(sc) + l(-sr) with
    sc, sr from the batch's reference log-probs; raising both by delta / beta turns its rewards into
    sc - delta and sr - delta, i.e. TRL runs this loss with our delta. Loss and gradient to 1e-6; TRL's
    logged rewards are then ours minus delta."""
    loss = bco(beta)
    for step in range(3):
        batch = random_preference_batch(8, length=12, seed=int(beta * 1000) + 10 * step)
        per_token_logps = batch.pop("per_token_logps")
        logps, leaf = prefopt_pair_logps(batch, per_token_logps)
        out = loss(logps)  # updates delta with this micro-batch first, as the loss runs in training
        delta = out.metrics["delta"].item()
        assert step == 0 or abs(delta) > 1e-3
        shifted = {**batch, "ref_chosen_logps": batch["ref_chosen_logps"] + delta / beta,
                   "ref_rejected_logps": batch["ref_rejected_logps"] + delta / beta}
        trl = trl_compute_loss(trainer, shifted, per_token_logps, beta=beta, loss_types=["bco_pair"])
        assert_matches_trl(out, leaf, trl, reward_offset=delta)


# ----------------------------------------------------------------------------------------------------------
# Through the real engine


def test_engine_moves_delta_in_training_only_and_checkpoints_it(tiny_model_dir, pairs_dir, tmp_path, monkeypatch):
    """One optimizer step of 4 pairs in micro-batches of 2 updates delta twice; evaluating the held-out pairs
    (under no_grad, in the engine) leaves it alone; a checkpoint's state.json holds it and a new run resumed
    from that checkpoint starts from the same delta."""
    monkeypatch.setenv("PREFOPT_PLUGINS", "prefopt_plugins.losses.bco_pair")
    default_plugins.cache_clear()
    tree = tiny_recipe(tiny_model_dir, pairs_dir, tmp_path / "run", loss={"name": "bco_pair", "beta": 0.1},
                       data={"eval_split": "test"}, train={"batch_size": 4, "micro_batch_size": 2, "max_steps": 2})
    try:
        run = engine.setup(validated(tree), show_progress=False)
        assert run.loss.state_dict() == {"delta": 0.0, "batches": 0}
        engine.train_step(run, 0)
        trained = run.loss.state_dict()
        assert trained["batches"] == 2 and trained["delta"] != 0.0
        evaluated = engine.evaluate_pairs(run)
        assert run.loss.state_dict() == trained
        assert evaluated["eval/loss/delta"] == pytest.approx(trained["delta"], rel=1e-6)

        engine.save(run, 1)
        saved = json.loads((checkpoint.latest_checkpoint(tmp_path / "run") / "state.json").read_text())
        assert saved["loss_state"] == trained
        resumed = engine.setup(validated({**tree, "output": {**tree["output"], "resume": "auto"}}),
                               show_progress=False)
        assert resumed.start_step == 1 and resumed.loss.state_dict() == trained
    finally:
        default_plugins.cache_clear()
