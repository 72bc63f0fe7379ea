"""SPPO with hard labels: square losses pulling the chosen log-ratio to +1/(2 beta), the rejected to -1/(2 beta)."""

from __future__ import annotations

from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class SPPOHardConfig(LossConfig):
    beta: float = Field(
        0.001,
        gt=0,
        description="The inverse of the paper's eta: each log-ratio is regressed to +-1/(2*beta). 0.001 "
        "(eta = 1000) is the paper's per the TRL index; the official recipe uses 0.01; TRL's default is 0.1.",
    )


class SPPOHard(PreferenceLoss):
    """Self-play preference optimization, hard labels: (Dc - 1/(2 beta))^2 + (Dr + 1/(2 beta))^2.

    Wu, Sun, Yuan, Ji, Yang, Gu (2024), "Self-Play Preference Optimization for Language Model Alignment",
    ICLR 2025, arXiv:2405.00675.

    Loss, per pair, with Dc = pc - rc, Dr = pr - rr:
        L = (Dc - 1/(2*beta))^2 + (Dr + 1/(2*beta))^2
    SPPO regresses each response's log-ratio against the previous iterate (the reference) to
    eta * (P(y beats the current policy) - 1/2), with eta = 1/beta and P estimated by a preference model.
    Hard labels set P = 1 for the chosen response and 0 for the rejected one (Eq. 4.7 with P in {0, 1}).
    Unlike DPO, the two responses are fitted separately: the chosen log-ratio is pushed up and the rejected
    one down, each to a finite target.

    Hyperparameters: ``beta`` (> 0, default 0.001, i.e. eta = 1000, the paper's per the TRL index; the
    official recipe uses 0.01; TRL's default is 0.1).

    Equals TRL's ``DPOTrainer(loss_type="sppo_hard")``, which sums the two squares; the official trainer
    averages them (half this loss, the same as halving the learning rate of plain SGD). Only the offline
    loss: not the soft win-probabilities nor the iterative self-play loop. Rewards are DPO's, beta * (p - r).
    """

    name = "sppo_hard"
    Config = SPPOHardConfig
    paper = "Wu et al. 2024, Self-Play Preference Optimization for Language Model Alignment, arXiv:2405.00675"

    def __call__(self, logps: PairLogps) -> LossOutput:
        target = 0.5 / self.config.beta
        chosen = logps.chosen_logratios
        rejected = logps.rejected_logratios
        loss = (chosen - target) ** 2 + (rejected + target) ** 2
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards)


@hookimpl
def prefopt_register_losses():
    return [SPPOHard]
