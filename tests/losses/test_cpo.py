"""CPO (``prefopt_plugins.losses.cpo``): hand-worked values, the NLL split, and parity with TRL 1.16.

Notation as in VARIANTS.md §0: ``pc, pr`` the policy's summed response log-probs, ``Lc`` the chosen
response length, B pairs per micro-batch, and

    L = mean_i[-log sigmoid(beta * (pc_i - pr_i))] + alpha * (-sum_i pc_i / sum_i Lc_i),

returned per pair as  -log sigmoid(beta * (pc_i - pr_i)) + alpha * (-pc_i * B / sum_j Lc_j).
"""

from __future__ import annotations

import math

import pytest
import torch

from cpo_orpo_harness import reference_free_pair_logps as pair_logps
from cpo_orpo_harness import build_trainer, configure, random_pair_batch, response_logps, run_trl
from prefopt import PairLogps, chosen_nll_per_pair
from prefopt_plugins.losses.cpo import CPO

F64 = torch.float64



def cpo(beta: float, alpha: float) -> CPO:
    return CPO(CPO.Config(beta=beta, alpha=alpha))


def cat(*logps: PairLogps) -> PairLogps:
    """Several micro-batches' PairLogps as one batch."""
    return PairLogps(**{
        name: torch.cat([getattr(lp, name) for lp in logps])
        for name in ("policy_chosen", "policy_rejected", "chosen_tokens", "rejected_tokens")
    })


# ----------------------------------------------------------------------------------------------------------
# Hand-worked values


def test_two_pairs_by_hand():
    """Pair 1: pc = -2 over Lc = 2, pr = -5.  Pair 2: pc = -6 over Lc = 4, pr = -4.  beta = 0.5, alpha = 1.

    preference  pair 1: z = 0.5 * (-2 + 5) = 1.5,  -log sigmoid(1.5) = 0.2014132779827524
                pair 2: z = 0.5 * (-6 + 4) = -1,   -log sigmoid(-1)  = 1.3132616875182228
    NLL, token mean over the micro-batch: (2 + 6) / (2 + 4) = 4/3
        per pair: -pc_i * B / sum Lc = 2 * 2/6 = 2/3 and 6 * 2/6 = 2  (mean 4/3; not 2/2 = 1 and 6/4 = 1.5,
        the per-sequence means, whose mean 1.25 would weigh pair 1's two tokens as much as pair 2's four)
    loss per pair: 0.2014132779827524 + 2/3 = 0.8680799446494191,  1.3132616875182228 + 2 = 3.3132616875182228
    batch mean: 2.0906708160838207 = (0.2014... + 1.3132...)/2 + 4/3
    rewards: beta * pc = -1, -3 and beta * pr = -2.5, -2.  Tolerance 1e-12 in float64.
    """
    out = cpo(0.5, 1.0)(pair_logps([-2.0, -6.0], [-5.0, -4.0], [2.0, 4.0], [3.0, 3.0]))

    torch.testing.assert_close(
        out.loss, torch.tensor([0.8680799446494191, 3.3132616875182228], dtype=F64), rtol=0, atol=1e-12
    )
    assert out.loss.mean().item() == pytest.approx(2.0906708160838207, abs=1e-12)
    assert out.metrics["nll"].item() == pytest.approx(4 / 3, abs=1e-12)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([-1.0, -3.0], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-2.5, -2.0], dtype=F64), rtol=0, atol=1e-12)


def test_alpha_zero_leaves_the_reference_free_sigmoid():
    """alpha = 0: L = -log sigmoid(beta * (pc - pr)), DPO with rc = rr = 0. Pair 1 above: 0.2014132779827524."""
    out = cpo(0.5, 0.0)(pair_logps([-2.0], [-5.0], [2.0], [3.0]))
    assert out.loss.item() == pytest.approx(0.2014132779827524, abs=1e-12)


def test_gradient_of_both_terms():
    """dL_i/dpc_i = -beta * sigmoid(-z_i) - alpha * B / sum Lc; dL_i/dpr_i = +beta * sigmoid(-z_i).
    Pair 1 above (beta 0.5, alpha 1, B = 2, sum Lc = 6): sigmoid(-1.5) = 0.18242552380635635, so
        dL_1/dpc_1 = -0.09121276190317818 - 1/3 = -0.4245460952365115,  dL_1/dpr_1 = 0.09121276190317818
    Pair 2: sigmoid(1) = 0.7310585786300049, so
        dL_2/dpc_2 = -0.36552928931500245 - 1/3 = -0.6988626226483358,  dL_2/dpr_2 = 0.36552928931500245
    """
    logps = pair_logps([-2.0, -6.0], [-5.0, -4.0], [2.0, 4.0], [3.0, 3.0], requires_grad=True)
    cpo(0.5, 1.0)(logps).loss.sum().backward()

    torch.testing.assert_close(
        logps.policy_chosen.grad, torch.tensor([-0.4245460952365115, -0.6988626226483358], dtype=F64),
        rtol=0, atol=1e-12,
    )
    torch.testing.assert_close(
        logps.policy_rejected.grad, torch.tensor([0.09121276190317818, 0.36552928931500245], dtype=F64),
        rtol=0, atol=1e-12,
    )


def test_nll_split_under_gradient_accumulation():
    """The engine sums per-pair losses over a step's micro-batches and divides by the step's pairs.

    Micro-batch A: pc = -2, -6 over Lc = 2, 4  -> token mean 8/6 = 4/3
    Micro-batch B: pc = -9, -1 over Lc = 3, 1  -> token mean 10/4 = 5/2
    The step's NLL = (2 * 4/3 + 2 * 5/2) / 4 = 23/12 = 1.9166..., the mean of the two token means, which
    is what TRL gets with gradient accumulation 2 (each micro-batch's loss divided by 2). A token mean
    over the whole step would be 18/10 = 1.8: neither reduces that way. One micro-batch of all four
    pairs gives 18/10 per pair on average, which is why the micro-batch size changes the NLL's weighting.
    """
    a = pair_logps([-2.0, -6.0], [-1.0, -1.0], [2.0, 4.0], [1.0, 1.0])
    b = pair_logps([-9.0, -1.0], [-1.0, -1.0], [3.0, 1.0], [1.0, 1.0])
    nll_a, mean_a = chosen_nll_per_pair(a)
    nll_b, mean_b = chosen_nll_per_pair(b)

    assert (mean_a.item(), mean_b.item()) == pytest.approx((4 / 3, 5 / 2), abs=1e-12)
    assert nll_a.mean().item() == pytest.approx(4 / 3, abs=1e-12)
    assert (torch.cat([nll_a, nll_b]).sum() / 4).item() == pytest.approx(23 / 12, abs=1e-12)
    nll_all, mean_all = chosen_nll_per_pair(cat(a, b))
    assert nll_all.mean().item() == pytest.approx(1.8, abs=1e-12) and mean_all.item() == pytest.approx(1.8)


def test_needs_no_reference():
    """Reference-free, and the NLL needs only the summed log-probs and token counts, not per-token ones."""
    assert CPO.requires_reference is False
    assert CPO.requires_token_logps is False


def test_config_defaults_and_bounds():
    """beta 0.1 and alpha 1.0 (TRL's beta and cpo_alpha defaults); beta > 0, alpha >= 0, no unknown keys."""
    from pydantic import ValidationError

    config = CPO.Config()
    assert (config.beta, config.alpha) == (0.1, 1.0)
    with pytest.raises(ValidationError, match="greater than 0"):
        CPO.Config(beta=0)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        CPO.Config(alpha=-1)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        CPO.Config(cpo_alpha=1.0)


# ----------------------------------------------------------------------------------------------------------
# Parity with TRL 1.16 CPOTrainer(loss_type="sigmoid")


@pytest.fixture(scope="module")
def trl_cpo_trainer(tiny_model_dir, tokenizer, tmp_path_factory):
    """Built once with loss_type="sigmoid"; each case then sets beta and cpo_alpha on it."""
    trainer = build_trainer("cpo", tiny_model_dir, tokenizer, tmp_path_factory.mktemp("trl-cpo"), loss_type="sigmoid")
    assert trainer.loss_type == "sigmoid" and trainer.cpo_alpha == 1.0
    assert trainer.alpha == 0.0 and trainer.label_smoothing == 0.0  # no AlphaPO shaping, no smoothing
    return trainer


def assert_matches_trl(out, ours, our_grad, trl_loss, trl_metrics, trl_grad):
    assert trl_loss.dtype == F64 and ours.dtype == F64
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6, rel=0)
    torch.testing.assert_close(our_grad, trl_grad, rtol=0, atol=1e-6)
    assert out.chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-6, rel=0)
    assert out.rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-6, rel=0)
    margins = (out.chosen_rewards - out.rejected_rewards).mean().item()
    assert margins == pytest.approx(trl_metrics["rewards/margins"], abs=1e-6, rel=0)
    accuracy = (out.chosen_rewards > out.rejected_rewards).to(F64).mean().item()
    assert accuracy == pytest.approx(trl_metrics["rewards/accuracies"], abs=1e-6)


@pytest.mark.parametrize("beta, alpha", [(0.01, 1.0), (0.1, 0.0), (0.1, 1.0), (0.5, 0.5), (1.0, 2.0)])
def test_matches_trl_cpo_trainer(beta, alpha, trl_cpo_trainer):
    """prefopt's CPO equals TRL 1.16 ``CPOTrainer.get_batch_loss_metrics`` with loss_type="sigmoid",
    cpo_alpha=alpha, to 1e-6 in float64: the loss, its gradient with respect to every logit, the logged
    NLL and the reward metrics.

    TRL's code: ``concatenated_forward`` (the NLL as ``nn.CrossEntropyLoss()`` over the chosen rows' labels,
    prompt and padding at -100; summed log-probs from ``get_batch_logps``), ``cpo_loss`` (sigmoid) and
    ``losses.mean() + cpo_alpha * nll``. Stubbed: the policy forward (``LogitsStub``, float64 logits) and
    the collated batch (see ``cpo_orpo_harness``). prefopt gets the summed response log-probs and counts.
    """
    trainer = configure(trl_cpo_trainer, beta=beta, cpo_alpha=alpha)
    batch, logits = random_pair_batch(pairs=6, length=14, vocab=11, seed=int(1000 * beta + 10 * alpha))

    trl_loss, trl_metrics, trl_grad = run_trl(trainer, batch, logits)

    out = cpo(beta, alpha)(response_logps(batch, logits))
    ours = out.loss.mean()
    (our_grad,) = torch.autograd.grad(ours, logits)

    assert_matches_trl(out, ours, our_grad, trl_loss, trl_metrics, trl_grad)
    if alpha:  # TRL skips the NLL (and logs 0) when cpo_alpha == 0
        assert out.metrics["nll"].item() == pytest.approx(trl_metrics["nll_loss"], abs=1e-6, rel=0)
        # Informative: the token mean differs from the mean of per-sequence means on this draw.
        logps = response_logps(batch, logits)
        per_sequence = (-logps.policy_chosen / logps.chosen_tokens).mean().item()
        assert abs(per_sequence - trl_metrics["nll_loss"]) > 1e-3


def test_matches_trl_under_gradient_accumulation(trl_cpo_trainer):
    """Two micro-batches of 3 pairs, gradient accumulation 2. TRL's Trainer divides each micro-batch's
    loss by 2 (``CPOTrainer.loss_is_scaled_for_ga = False``) and adds the gradients; the engine adds the
    per-pair losses of all 6 pairs and divides by 6. Loss and gradients agree to 1e-6 (beta 0.1, alpha 1).
    """
    trainer = configure(trl_cpo_trainer, beta=0.1, cpo_alpha=1.0)
    micro = [random_pair_batch(pairs=3, length=14, vocab=11, seed=seed) for seed in (7, 8)]

    trl_total, trl_grads = 0.0, []
    for batch, logits in micro:
        loss, _, grad = run_trl(trainer, batch, logits)
        trl_total += loss.item() / 2
        trl_grads.append(grad / 2)

    loss = cpo(0.1, 1.0)
    per_pair = torch.cat([loss(response_logps(batch, logits)).loss for batch, logits in micro])
    ours = per_pair.sum() / 6
    our_grads = torch.autograd.grad(ours, [logits for _, logits in micro])

    assert ours.item() == pytest.approx(trl_total, abs=1e-6, rel=0)
    for our_grad, trl_grad in zip(our_grads, trl_grads):
        torch.testing.assert_close(our_grad, trl_grad, rtol=0, atol=1e-6)
    assert not math.isclose(ours.item(), loss(cat(*(response_logps(b, l) for b, l in micro))).loss.mean().item())
