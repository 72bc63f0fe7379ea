"""The hinge loss on the policy-vs-reference margin: SLiC's calibration loss normalized by the reference (RSO)."""

from __future__ import annotations

import torch
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class RSOHingeConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="Inverse margin: the loss is zero once the log-ratio margin reaches 1/beta (typical "
        "0.05-0.5). 0.1 is TRL's default; the RSO example in TRL uses 0.05.",
    )


class RSOHinge(PreferenceLoss):
    """Hinge loss on the reference-normalized margin: relu(1 - beta * margin), TRL's loss_type="hinge".

    Liu, Zhao, Joshi, Khalman, Saleh, Liu, Liu (2024), "Statistical Rejection Sampling Improves Preference
    Optimization" (RSO), ICLR 2024, arXiv:2309.06657; the hinge comes from SLiC-HF, Zhao, Joshi, Liu,
    Khalman, Saleh, Liu (2023), arXiv:2305.10425.

    Loss, per pair ("hinge-norm"):  L = max(0, 1 - beta * ((pc - rc) - (pr - rr)))
    SLiC-HF's calibration loss max(0, delta - pc + pr) compares raw log-likelihoods; RSO normalizes them by
    the reference, which makes it a drop-in alternative to DPO's logistic loss: the same margin, but pairs
    already separated by 1/beta nats stop contributing any gradient at all, rather than a vanishing one.

    Hyperparameters: ``beta`` (> 0, default 0.1 as TRL), the reciprocal of the margin in log-ratio units.

    Equals TRL's ``DPOTrainer(loss_type="hinge")``. Not SLiC-HF itself, which is reference-free and adds a
    cross-entropy regularizer on a target sequence. Named ``rso_hinge`` because it is RSO's form (and so as
    not to take the plain name ``hinge`` from third-party plugins). Rewards are DPO's, beta * (p - r).
    """

    name = "rso_hinge"
    Config = RSOHingeConfig
    paper = "Liu et al. 2024, Statistical Rejection Sampling Improves Preference Optimization (RSO), arXiv:2309.06657"

    def __call__(self, logps: PairLogps) -> LossOutput:
        margin = logps.logratio_margin
        loss = torch.relu(1 - self.config.beta * margin)
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards)


@hookimpl
def prefopt_register_losses():
    return [RSOHinge]
