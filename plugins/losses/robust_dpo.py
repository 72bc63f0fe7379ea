"""Robust DPO (rDPO): an unbiased DPO loss under preference labels flipped at a known rate epsilon."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class RobustDPOConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the KL tie to the reference, as in DPO (typical 0.01-0.5); 0.1 is TRL's default.",
    )
    epsilon: float = Field(
        0.1,
        ge=0,
        lt=0.5,
        description="The label-flip rate of the data, in [0, 0.5); 0 is plain DPO. 0.1 is the paper's (Sec. 6); "
        "TRL's `label_smoothing` defaults to 0.",
    )


class RobustDPO(PreferenceLoss):
    """Robust DPO: DPO's loss debiased for labels flipped with probability epsilon (may be negative).

    Chowdhury, Kini, Natarajan (2024), "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    ICML 2024, arXiv:2403.00409.

    Loss, per pair:  L = ((1 - eps) * l(h) - eps * l(-h)) / (1 - 2 eps),
        l(z) = -log sigmoid(z),   h = beta * ((pc - rc) - (pr - rr)).
    If the observed label is flipped with probability eps, the expectation of L over the flip equals the DPO
    loss on the clean label: the correction is unbiased, where cDPO's soft label only caps the margin. L
    is unbounded below: the subtracted eps * l(-h) grows like eps * h, so L turns negative at large margins,
    where its slope in h tends to -eps/(1 - 2 eps) instead of vanishing as DPO's does.

    Hyperparameters: ``beta`` (> 0, default 0.1 as TRL); ``epsilon`` in [0, 0.5) (default 0.1, the paper's;
    TRL's ``label_smoothing`` defaults to 0, which is DPO).

    Equals TRL's ``DPOTrainer(loss_type="robust", label_smoothing=eps)`` (contributed by a paper author).
    Rewards are DPO's, beta * (p - r).
    """

    name = "robust_dpo"
    Config = RobustDPOConfig
    paper = "Chowdhury et al. 2024, Provably Robust DPO: Aligning Language Models with Noisy Feedback, arXiv:2403.00409"

    def __call__(self, logps: PairLogps) -> LossOutput:
        eps = self.config.epsilon
        margin = logps.logratio_margin
        h = self.config.beta * margin
        loss = (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards)


@hookimpl
def prefopt_register_losses():
    return [RobustDPO]
