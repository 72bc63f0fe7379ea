"""beta-DPO (``prefopt_plugins.losses.beta_dpo``): hand-worked first and second batches (the running update), the
Gaussian filter, training-only updates, the checkpoint round trip, and the reduction to DPO. Not in TRL.

Notation as in VARIANTS.md §0 and §30: margins ``m = (pc - rc) - (pr - rr)``, ``l(z) = -log sigmoid(z)``, and per
training micro-batch

    M0 <- 0.9 M0 + 0.1 mean(m),   sigma <- 0.9 sigma + 0.1 std(m)            (before the loss)
    keep floor((1 - rho) B) pairs, drawn with weights exp(-(m - M0)^2 / (2 sigma^2))
    beta_b = beta * (1 + alpha * (mean of kept m - M0)),   L = mean over kept pairs of l(beta_b * m).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from helpers import tiny_recipe, validated
from prefopt import engine
from prefopt.engine import checkpoint
from prefopt.registry.loading import default_plugins
from prefopt_plugins.losses.beta_dpo import BetaDPO
from prefopt_plugins.losses.dpo import DPO
from trl_harness import pair_logps_of, prefopt_pair_logps, random_preference_batch

F64 = torch.float64


def beta_dpo(**config) -> BetaDPO:
    return BetaDPO(BetaDPO.Config(**config))


def l(z: float) -> float:
    return math.log1p(math.exp(-z))


def margins(values, requires_grad=True):
    """Pairs whose margins are ``values``: pc = m, everything else 0."""
    zeros = [0.0] * len(values)
    return pair_logps_of([float(v) for v in values], zeros, zeros, zeros, requires_grad=requires_grad)


def random_pairs(seed: int, pairs: int = 8):
    """A random batch as the engine would hand it over, and the per-token leaf its gradients reach."""
    batch = random_preference_batch(pairs, length=12, seed=seed)
    return prefopt_pair_logps(batch, batch.pop("per_token_logps"))


def test_first_and_second_batch_by_hand():
    """beta 0.1, alpha 0.5, rho 0 (every pair kept), momentum 0.9; the statistics update before the loss.
    Batch 1, m = [1, 2, 3]: mean 2, std 1 -> M0 = 0.1 * 2 = 0.2, sigma = 0.1 * 1 = 0.1;
        beta_b = 0.1 * (1 + 0.5 * (2 - 0.2)) = 0.19;  L = [l(0.19), l(0.38), l(0.57)]
                                                       = [0.602653, 0.521090, 0.448222].
    Batch 2, m = [0, 4]: mean 2, std sqrt(8) = 2.828427 -> M0 = 0.9 * 0.2 + 0.1 * 2 = 0.38,
        sigma = 0.9 * 0.1 + 0.1 * 2.828427 = 0.372843;  beta_b = 0.1 * (1 + 0.5 * (2 - 0.38)) = 0.181;
        L = [l(0), l(0.724)] = [0.693147, 0.395286].
    Rewards use the base beta: 0.1 * m. Tolerance 1e-12."""
    loss = beta_dpo(beta=0.1, alpha=0.5, rho=0.0)
    out = loss(margins([1, 2, 3]))
    torch.testing.assert_close(out.loss, torch.tensor([l(0.19), l(0.38), l(0.57)], dtype=F64), rtol=0, atol=1e-12)
    assert out.metrics["beta"].item() == pytest.approx(0.19, abs=1e-12)
    assert out.metrics["margin_mean"].item() == pytest.approx(0.2, abs=1e-12)
    assert out.metrics["margin_std"].item() == pytest.approx(0.1, abs=1e-12)
    assert out.metrics["kept"].item() == 1.0
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.1, 0.2, 0.3], dtype=F64), rtol=0, atol=1e-12)

    out = loss(margins([0, 4]))
    torch.testing.assert_close(out.loss, torch.tensor([l(0.0), l(0.724)], dtype=F64), rtol=0, atol=1e-12)
    assert out.metrics["beta"].item() == pytest.approx(0.181, abs=1e-12)
    state = loss.state_dict()
    assert state["margin_mean"] == pytest.approx(0.38, abs=1e-12)
    assert state["margin_std"] == pytest.approx(0.09 + 0.1 * math.sqrt(8), abs=1e-12)
    assert state["updates"] == 2


def test_filter_drops_the_outlier_by_hand():
    """As above with rho = 0.5: batch 1 keeps floor(0.5 * 3) = 1 pair (its draw is random); the state does
    not depend on the draw. Batch 2 keeps 1 of 2: m = 4 sits (4 - 0.38) / 0.372843 = 9.7 sigmas from M0
    (weight e^-47) and m = 0 1.0 sigma (weight e^-0.52), so pair 0 is kept. beta_b = 0.1 * (1 + 0.5 * (0 -
    0.38)) = 0.081, and the kept pair carries the whole mean: L = [2 * l(0), 0] = [1.386294, 0], mean log 2.
    The dropped pair gets no gradient."""
    loss = beta_dpo(beta=0.1, alpha=0.5, rho=0.5)
    assert loss(margins([1, 2, 3])).metrics["kept"].item() == pytest.approx(1 / 3, abs=1e-12)
    logps = margins([0, 4])
    out = loss(logps)
    torch.testing.assert_close(out.loss, torch.tensor([2 * math.log(2), 0.0], dtype=F64), rtol=0, atol=1e-12)
    assert out.metrics["beta"].item() == pytest.approx(0.081, abs=1e-12)
    assert out.metrics["kept"].item() == 0.5
    out.loss.mean().backward()
    assert logps.policy_chosen.grad[1].item() == 0.0 and logps.policy_chosen.grad[0].item() != 0.0


def exclusion_probabilities(weights: list[float]) -> list[float]:
    """P(pair j is the one left out) when 2 of 3 are drawn one by one without replacement, each draw
    proportional to the remaining weights (``torch.multinomial(w, 2, replacement=False)``)."""
    total = sum(weights)
    result = []
    for j in range(3):
        a, b = (i for i in range(3) if i != j)
        result.append(weights[a] / total * weights[b] / (total - weights[a])
                      + weights[b] / total * weights[a] / (total - weights[b]))
    return result


def test_filter_draws_without_replacement_with_gaussian_weights():
    """With M0 = 0, sigma = 1 and margins [0, 1, 2] the weights are exp(-m^2 / 2) = [1, 0.607, 0.135]; keeping
    2 of 3 over 3000 draws (each seeded by a different batch count) leaves each pair out as often as sequential
    draws without replacement would (0.071, 0.153, 0.776), within 0.03."""
    loss = beta_dpo(rho=1 / 3)
    gaps = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    mean, std = torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)
    left_out = torch.zeros(3, dtype=F64)
    draws = 3000
    for updates in range(draws):
        loss.updates = updates
        left_out += 1 - loss._filter(gaps, mean, std, 2)
    expected = exclusion_probabilities([math.exp(-0.5 * m * m) for m in (0.0, 1.0, 2.0)])
    torch.testing.assert_close(left_out / draws, torch.tensor(expected, dtype=F64), rtol=0, atol=0.03)


def test_evaluation_and_probes_read_the_state_without_moving_it():
    """After training on batch 1 (M0 = 0.2), a forward with ``training`` off (how the engine evaluates), one
    under no_grad, or one on log-probs without gradient leaves the state alone, keeps every pair even with
    rho > 0, and takes beta_b from the mean of all margins: m = [0, 4] -> beta_b = 0.1 * (1 + 0.5 * (2 - 0.2))
    = 0.19, L = [l(0), l(0.76)]."""
    loss = beta_dpo(beta=0.1, alpha=0.5, rho=0.5)
    loss(margins([1, 2, 3]))
    trained = loss.state_dict()
    expected = torch.tensor([l(0.0), l(0.76)], dtype=F64)

    loss.train(False)
    out = loss(margins([0, 4]))
    loss.train(True)
    with torch.no_grad():
        probed = loss(margins([0, 4]))
    frozen = loss(margins([0, 4], requires_grad=False))
    for result in (out, probed, frozen):
        torch.testing.assert_close(result.loss.detach(), expected, rtol=0, atol=1e-12)
        assert result.metrics["kept"].item() == 1.0
    assert loss.state_dict() == trained


def test_state_dict_round_trip_gives_identical_next_outputs():
    """state_dict is plain JSON; a new instance loaded from it gives bit-identical next outputs (losses,
    gradients, every metric, the filter's draw included) to the instance that kept running, over two
    further batches. And a checkpoint with the wrong keys is refused."""
    config = dict(beta=0.1, alpha=0.6, rho=0.25, seed=7)
    first = beta_dpo(**config)
    for seed in range(2):
        first(random_pairs(seed)[0])
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = beta_dpo(**config)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == first.state_dict()
    for seed in (2, 3):
        (a, leaf_a), (b, leaf_b) = random_pairs(seed), random_pairs(seed)
        out_a, out_b = first(a), resumed(b)
        assert torch.equal(out_a.loss, out_b.loss)
        assert out_a.metrics["kept"].item() == 0.75
        for key in out_a.metrics:
            assert torch.equal(out_a.metrics[key], out_b.metrics[key]), key
        out_a.loss.mean().backward()
        out_b.loss.mean().backward()
        assert torch.equal(leaf_a.grad, leaf_b.grad)
    assert resumed.state_dict() == first.state_dict()
    with pytest.raises(ValueError, match="expects state keys"):
        beta_dpo().load_state_dict({"margin_mean": 0.1})


def test_without_batch_statistics_it_is_dpo():
    """alpha = 0 (beta not rescaled) and rho = 0 (no pair filtered): over three training batches, while the
    state keeps moving, losses and gradients equal DPO's at the same beta to 1e-12."""
    loss, dpo = beta_dpo(beta=0.2, alpha=0.0, rho=0.0), DPO(DPO.Config(beta=0.2))
    for seed in range(3):
        (ours, our_leaf), (theirs, their_leaf) = random_pairs(seed), random_pairs(seed)
        out, ref = loss(ours), dpo(theirs)
        torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-12)
        out.loss.mean().backward()
        ref.loss.mean().backward()
        torch.testing.assert_close(our_leaf.grad, their_leaf.grad, rtol=0, atol=1e-12)
    assert loss.state_dict()["updates"] == 3 and loss.state_dict()["margin_std"] > 0


def test_corner_cases_stay_finite():
    """A first batch of equal margins (the policy starting as the reference) gives sigma = 0: the filter falls
    back to a uniform draw instead of 0 / 0. A one-pair batch leaves sigma as it was (no spread to average)
    and keeps its pair even with rho > 0. beta_b never falls below min(1e-3, beta): a batch far below M0
    would otherwise flip its sign. floor((1 - rho) B) is not lost to rounding: 30 * (1 - 0.9) keeps 3."""
    loss = beta_dpo(beta=0.1, alpha=0.6, rho=0.5)
    out = loss(margins([0, 0, 0, 0]))
    assert torch.isfinite(out.loss).all() and out.metrics["kept"].item() == 0.5
    assert loss.state_dict()["margin_std"] == 0.0

    loss = beta_dpo(beta=0.1, alpha=0.6, rho=0.5)
    loss(margins([1, 3]))
    sigma = loss.state_dict()["margin_std"]
    out = loss(margins([2]))
    assert loss.state_dict()["margin_std"] == sigma and out.metrics["kept"].item() == 1.0
    assert torch.isfinite(out.loss).all()

    loss = beta_dpo(beta=0.1, alpha=0.6, rho=0.0)
    loss(margins([100, 100]))
    assert loss(margins([-50, -50])).metrics["beta"].item() == pytest.approx(1e-3, abs=1e-15)
    assert beta_dpo(beta=1e-4, alpha=0.6, rho=0.0)(margins([-50, -50])).metrics["beta"].item() == pytest.approx(1e-4)
    assert beta_dpo(rho=0.9)._kept_count(30) == 3


def test_config_defaults_and_bounds():
    """The official README's example: beta 0.1, alpha (`a`) 0.6, rho (`mode_weight`) 0.2; momentum 0.9 as the
    official code's fixed gamma."""
    config = BetaDPO.Config()
    assert (config.beta, config.alpha, config.rho, config.momentum, config.seed) == (0.1, 0.6, 0.2, 0.9, 0)
    with pytest.raises(ValidationError, match="greater than 0"):
        BetaDPO.Config(beta=0)
    with pytest.raises(ValidationError, match="less than 1"):
        BetaDPO.Config(rho=1.0)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        BetaDPO.Config(alpha=-0.1)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        BetaDPO.Config(a=0.6)


# ----------------------------------------------------------------------------------------------------------
# Through the real engine


def test_engine_moves_state_in_training_only_and_checkpoints_it(tiny_model_dir, pairs_dir, tmp_path, monkeypatch):
    """One optimizer step of 4 pairs in micro-batches of 2 updates the state twice; evaluating the held-out
    pairs leaves it alone; a checkpoint's state.json holds it and a run resumed from it starts from it."""
    monkeypatch.setenv("PREFOPT_PLUGINS", "prefopt_plugins.losses.beta_dpo")
    default_plugins.cache_clear()
    tree = tiny_recipe(tiny_model_dir, pairs_dir, tmp_path / "run", loss={"name": "beta_dpo"},
                       data={"eval_split": "test"}, train={"batch_size": 4, "micro_batch_size": 2, "max_steps": 2})
    try:
        run = engine.setup(validated(tree), show_progress=False)
        assert run.loss.state_dict() == {"margin_mean": 0.0, "margin_std": 0.0, "updates": 0}
        values = engine.train_step(run, 0)
        trained = run.loss.state_dict()
        assert trained["updates"] == 2
        assert values["loss/kept"] == pytest.approx(0.5)  # floor(0.8 * 2) = 1 of each 2 pairs
        evaluated = engine.evaluate_pairs(run)
        assert run.loss.state_dict() == trained
        assert evaluated["eval/loss/kept"] == 1.0
        assert evaluated["eval/loss/margin_mean"] == pytest.approx(trained["margin_mean"], rel=1e-6, abs=1e-12)

        engine.save(run, 1)
        saved = json.loads((checkpoint.latest_checkpoint(tmp_path / "run") / "state.json").read_text())
        assert saved["loss_state"] == trained
        resumed = engine.setup(validated({**tree, "output": {**tree["output"], "resume": "auto"}}),
                               show_progress=False)
        assert resumed.start_step == 1 and resumed.loss.state_dict() == trained
    finally:
        default_plugins.cache_clear()
