"""rewards/accuracies: a margin within float rounding of zero is a tie (0.5), any larger one counts as TRL does."""

from __future__ import annotations

import torch

from prefopt import PairLogps, dpo_rewards
from prefopt.api.loss import LossOutput
from prefopt.engine.metrics import TIE_RTOL, PairMetrics


def _accuracy(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1) -> float:
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    logps = PairLogps(policy_chosen=t(policy_chosen), policy_rejected=t(policy_rejected),
                      chosen_tokens=t([20.0] * len(policy_chosen)), rejected_tokens=t([20.0] * len(policy_chosen)),
                      ref_chosen=t(ref_chosen), ref_rejected=t(ref_rejected))
    chosen, rejected = dpo_rewards(beta, logps)
    metrics = PairMetrics()
    metrics.add(logps, LossOutput(loss=torch.zeros(len(policy_chosen)), chosen_rewards=chosen, rejected_rewards=rejected))
    return metrics.reduced(None)["rewards/accuracies"]


def test_rounding_sized_margins_are_ties_and_real_margins_count():
    # Sums of about 50 nats: a 4e-6 nat margin is float32 rounding (the float32 spacing at 50 is 3.8e-6).
    assert _accuracy([-50.0], [-51.0], [-50.0], [-51.0]) == 0.5  # the policy is its reference
    assert _accuracy([-50.0 + 3.8e-6], [-51.0], [-50.0], [-51.0]) == 0.5  # one ulp apart: still a tie
    # 1e-3 nats is far outside the band (TIE_RTOL x 202 = 2e-4 nats): ranked as TRL ranks it.
    assert TIE_RTOL * 202 < 1e-3
    assert _accuracy([-50.0 + 1e-3], [-51.0], [-50.0], [-51.0]) == 1.0
    assert _accuracy([-50.0 - 1e-3], [-51.0], [-50.0], [-51.0]) == 0.0
    # mixed: one tie, one win, one loss
    assert _accuracy([-50.0, -40.0, -30.0], [-51.0, -40.5, -30.0], [-50.0, -40.0, -30.5],
                     [-51.0, -41.0, -30.0]) == 0.5  # (0.5 + 0 + 1) / 3


def test_without_reference_every_margin_counts():
    t = torch.tensor
    logps = PairLogps(policy_chosen=t([-5.0, -5.0]), policy_rejected=t([-5.0, -6.0]),
                      chosen_tokens=t([2.0, 2.0]), rejected_tokens=t([2.0, 2.0]))
    metrics = PairMetrics()
    metrics.add(logps, LossOutput(loss=torch.zeros(2), chosen_rewards=logps.policy_chosen,
                                  rejected_rewards=logps.policy_rejected))
    assert metrics.reduced(None)["rewards/accuracies"] == 0.5  # (0 + 1) / 2: equal rewards are not a win
