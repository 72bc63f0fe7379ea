"""MRPO: hand-worked values from the official formulas, the reduction to DPO, K > 2, and the naive baseline."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from prefopt import PairLogps
from prefopt_plugins.losses.dpo import DPO, DPOConfig
from prefopt_plugins.losses.mrpo import MRPO, MRPOConfig

F64 = torch.float64


def logps_of(pc, pr, refs_c, refs_r, tokens=None, requires_grad=False) -> PairLogps:
    """Pairs in float64; refs_* are lists of per-reference lists (primary first)."""
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    policy_c = torch.tensor(pc, dtype=F64, requires_grad=requires_grad)
    policy_r = torch.tensor(pr, dtype=F64, requires_grad=requires_grad)
    counts = t(tokens or [1.0] * len(pc))
    return PairLogps(
        policy_chosen=policy_c, policy_rejected=policy_r, chosen_tokens=counts, rejected_tokens=counts,
        ref_chosen=t(refs_c[0]), ref_rejected=t(refs_r[0]), refs_chosen=t(refs_c), refs_rejected=t(refs_r),
    )


def official_k2(pc, pr, r2c, r2r, r1c, r1r, *, beta=0.1, eta=0.1, alpha=-1.0, naive=False):
    """One pair, K = 2, written scalar by scalar as the official trainer_mref.py computes it: r2 is the
    primary reference (the LoRA-disabled policy there), r1 the extra one."""
    a1, a2 = r1c - r1r, r2c - r2r
    w = abs(a1) / (abs(a1) + abs(a2) + 1e-6) if alpha < 0 else alpha
    b1, b2 = (r2c + r1c) / 2, (r2r + r1r) / 2
    scale = abs(b1) / (abs(b1) + abs(b2))
    eta1, eta2 = (eta * scale, eta * (1 - scale)) if eta >= 0 else (-eta, -eta)
    c1 = min(max(r1c, r2c * (1 + eta1)), r2c * (1 - eta1))
    c2 = min(max(r1r, r2r * (1 + eta2)), r2r * (1 - eta2))

    def mixed(x1, x2):
        c = max(x1, x2)
        return x1 + x2 - (c + math.log(w * math.exp(x1 - c) + (1 - w) * math.exp(x2 - c)))

    def dpo(rc, rr):
        return -math.log(1 / (1 + math.exp(-beta * ((pc - rc) - (pr - rr)))))

    if naive:
        return w * dpo(c1, c2) + (1 - w) * dpo(r2c, r2r)
    return dpo(mixed(c1, r2c), mixed(c2, r2r))


def test_hand_worked_pair_equals_the_official_formulas_and_its_pinned_value():
    # primary r0 = (-10, -12), extra r1 = (-9, -14): alpha = 5 / (5 + 2 + 1e-6); s = 9.5 / 22.5; the extra's
    # chosen -9 is clipped up to -9.5778 and its rejected -14 to -12.6933.
    out = MRPO(MRPOConfig(beta=0.1, clip=0.1))(logps_of([-8.0], [-13.0], [[-10.0], [-9.0]], [[-12.0], [-14.0]]))
    expected = official_k2(-8.0, -13.0, -10.0, -12.0, -9.0, -14.0)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.5696161997632, abs=1e-12)
    # rewards are beta * (policy - combined reference); combined chosen log pi~ = -9.896411948758521
    assert out.chosen_rewards.item() == pytest.approx(0.1 * (-8.0 + 9.896411948758521), abs=1e-12)


@pytest.mark.parametrize("eta,clip_rate", [(0.1, "adaptive"), (0.3, "adaptive"), (0.05, "fixed"), (0.0, "adaptive")])
@pytest.mark.parametrize("alpha", ["adaptive", 0.25])
def test_random_pairs_equal_the_official_code_at_k2(eta, clip_rate, alpha):
    g = torch.Generator().manual_seed(0)
    draw = lambda: (-torch.rand(16, generator=g, dtype=F64) * 30 - 1).tolist()  # noqa: E731
    pc, pr, r0c, r0r, r1c, r1r = (draw() for _ in range(6))
    config = MRPOConfig(beta=0.2, clip=eta, clip_rate=clip_rate, alpha=alpha)
    out = MRPO(config)(logps_of(pc, pr, [r0c, r1c], [r0r, r1r]))
    official_eta = eta if clip_rate == "adaptive" else -eta
    official_alpha = -1.0 if alpha == "adaptive" else alpha
    for i in range(16):
        expected = official_k2(pc[i], pr[i], r0c[i], r0r[i], r1c[i], r1r[i], beta=0.2, eta=official_eta,
                               alpha=official_alpha)
        assert out.loss[i].item() == pytest.approx(expected, abs=1e-10), i


def test_naive_multi_dpo_equals_the_official_baseline():
    pairs = ([-8.0, -20.0], [-13.0, -18.0], [[-10.0, -19.0], [-9.0, -25.0]], [[-12.0, -17.0], [-14.0, -16.0]])
    out = MRPO(MRPOConfig(naive=True))(logps_of(*pairs))
    for i in range(2):
        expected = official_k2(pairs[0][i], pairs[1][i], pairs[2][0][i], pairs[3][0][i], pairs[2][1][i],
                               pairs[3][1][i], naive=True)
        assert out.loss[i].item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("config", [{}, {"alpha": 0.3}, {"clip": None}, {"clip_rate": "fixed", "clip": 0.2}])
def test_every_reference_equal_is_dpo(k, config):
    g = torch.Generator().manual_seed(k)
    draw = lambda: (-torch.rand(8, generator=g, dtype=F64) * 20 - 1).tolist()  # noqa: E731
    pc, pr, rc, rr = draw(), draw(), draw(), draw()
    mrpo = MRPO(MRPOConfig(beta=0.3, **config))(logps_of(pc, pr, [rc] * k, [rr] * k, requires_grad=True))
    dpo = DPO(DPOConfig(beta=0.3))(logps_of(pc, pr, [rc], [rr]))
    torch.testing.assert_close(mrpo.loss, dpo.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(mrpo.chosen_rewards, dpo.chosen_rewards, rtol=0, atol=1e-6)


def test_k3_weights_sum_to_one_and_the_mixture_is_the_weighted_harmonic_mean():
    refs_c = torch.tensor([[-10.0], [-9.0], [-11.0]], dtype=F64)
    refs_r = torch.tensor([[-12.0], [-14.0], [-11.5]], dtype=F64)
    loss = MRPO(MRPOConfig(clip=None))
    w = loss.weights(refs_c, refs_r)[:, 0]
    m = [2.0, 5.0, 0.5]  # |chosen - rejected| of each reference
    total = sum(m)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert w[0].item() == pytest.approx((total - m[0]) / (2 * (total + 1e-6)), abs=1e-12)
    assert w[2].item() == pytest.approx((total - m[2] + 1e-6) / (2 * (total + 1e-6)), abs=1e-12)
    out = loss(logps_of([-8.0], [-13.0], refs_c.tolist(), refs_r.tolist()))
    harmonic_c = -math.log(sum(w[i].item() / math.exp(refs_c[i, 0].item()) for i in range(3)))
    harmonic_r = -math.log(sum(w[i].item() / math.exp(refs_r[i, 0].item()) for i in range(3)))
    expected = -math.log(1 / (1 + math.exp(-0.1 * ((-8.0 - harmonic_c) - (-13.0 - harmonic_r)))))
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)


def test_gradient_reaches_the_policy_only_and_sft_term_adds_the_chosen_nll():
    pairs = ([-8.0], [-13.0], [[-10.0], [-9.0]], [[-12.0], [-14.0]])
    plain = MRPO(MRPOConfig())(logps_of(*pairs, tokens=[4.0]))
    logps = logps_of(*pairs, tokens=[4.0], requires_grad=True)
    with_sft = MRPO(MRPOConfig(sft_weight=0.5))(logps)
    assert with_sft.loss.item() == pytest.approx(plain.loss.item() + 0.5 * 8.0 / 4.0, abs=1e-12)
    with_sft.loss.sum().backward()
    assert logps.policy_chosen.grad.item() < 0 and logps.policy_rejected.grad.item() > 0
    assert not logps.refs_chosen.requires_grad


def test_config_bounds():
    with pytest.raises(ValidationError, match="adaptive"):
        MRPOConfig(alpha=1.5)
    with pytest.raises(ValidationError):
        MRPOConfig(clip=1.0)
    with pytest.raises(ValueError, match="one extra reference"):
        MRPO(MRPOConfig(naive=True))(logps_of([-1.0], [-2.0], [[-1.0]] * 3, [[-2.0]] * 3))
