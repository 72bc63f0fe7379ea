"""APO, anchored preference optimization: APO-zero and APO-down, which say which way each likelihood must move."""

from __future__ import annotations

import torch
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl

PAPER = (
    "D'Oosterlinck et al. 2025, Anchored Preference Optimization and Contrastive Revisions, arXiv:2408.06266"
)


class APOConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="Scale of the implicit rewards beta * (p - r) inside the sigmoids (typical 0.1); 0.1 is the "
        "paper's (per the TRL index) and TRL's default.",
    )


class APOZero(PreferenceLoss):
    """APO-zero: raise the chosen likelihood and lower the rejected one, each against the reference.

    D'Oosterlinck, Xu, Develder, Demeester, Singh, Potts, Kiela, Mehri (2025), "Anchored Preference
    Optimization and Contrastive Revisions: Addressing Underspecification in Alignment", TACL 2025,
    arXiv:2408.06266 (Eq. 7).

    Loss, per pair, with Dc = pc - rc, Dr = pr - rr:
        L = (1 - sigmoid(beta * Dc)) + sigmoid(beta * Dr)
    DPO constrains only the gap Dc - Dr, so it is free to move both likelihoods the same way. APO anchors
    each to the reference: APO-zero pushes the chosen one up and the rejected one down. Use it when the
    chosen responses are better than what the model produces now (e.g. distilled from a stronger model).

    Hyperparameters: ``beta`` (> 0, default 0.1, the paper's and TRL's).

    Equals TRL's ``DPOTrainer(loss_type="apo_zero")`` (contributed by the first author). Rewards are
    DPO's, beta * (p - r).
    """

    name = "apo_zero"
    Config = APOConfig
    paper = PAPER

    def __call__(self, logps: PairLogps) -> LossOutput:
        beta = self.config.beta
        chosen = logps.chosen_logratios
        rejected = logps.rejected_logratios
        loss = (1 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)
        chosen_rewards, rejected_rewards = dpo_rewards(beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards)


class APODown(PreferenceLoss):
    """APO-down: lower both likelihoods against the reference, the rejected one more.

    D'Oosterlinck, Xu, Develder, Demeester, Singh, Potts, Kiela, Mehri (2025), "Anchored Preference
    Optimization and Contrastive Revisions: Addressing Underspecification in Alignment", TACL 2025,
    arXiv:2408.06266 (Eq. 8).

    Loss, per pair, with Dc = pc - rc, Dr = pr - rr:
        L = sigmoid(beta * Dc) + (1 - sigmoid(beta * (Dc - Dr)))
    The first term pushes the chosen likelihood down; the second is a DPO-like term on the gap that pushes
    the rejected one down further. Use it when the model is already better than the chosen responses, so
    that neither should be imitated, but their ordering still carries signal.

    Hyperparameters: ``beta`` (> 0, default 0.1, the paper's and TRL's).

    Equals TRL's ``DPOTrainer(loss_type="apo_down")`` (contributed by the first author). Rewards are DPO's,
    beta * (p - r).
    """

    name = "apo_down"
    Config = APOConfig
    paper = PAPER

    def __call__(self, logps: PairLogps) -> LossOutput:
        beta = self.config.beta
        chosen = logps.chosen_logratios
        rejected = logps.rejected_logratios
        loss = torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * (chosen - rejected)))
        chosen_rewards, rejected_rewards = dpo_rewards(beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards)


@hookimpl
def prefopt_register_losses():
    return [APOZero, APODown]
