"""R-DPO, length-regularized DPO: a response-length offset inside DPO's sigmoid."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class RDPOConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the KL tie to the reference, as in dpo (typical 0.01-0.5); 0.1 as in dpo.",
    )
    alpha: float = Field(
        0.05,
        ge=0,
        description="Weight of the length offset alpha * (Lc - Lr), in reward units per token; it is not "
        "scaled by beta. Its right size depends on typical length gaps: alpha * |Lc - Lr| should be comparable "
        "to beta * margin. 0.05 is the smallest value of the R-DPO grid {0.05, 0.1, 0.5, 1.0} used as a "
        "baseline in the SimPO paper; 0 gives plain DPO.",
    )


class RDPO(PreferenceLoss):
    """Length-regularized DPO: -log sigmoid(beta * margin + alpha * (Lc - Lr)).

    Park, Rafailov, Ermon, Finn (2024), "Disentangling Length from Quality in Direct Preference
    Optimization", Findings of ACL 2024, arXiv:2403.19159.

    Loss, per pair (eq. 9):  L = -log sigmoid(beta * ((pc - rc) - (pr - rr)) + alpha * (Lc - Lr))
    where pc, pr are the policy's summed log-probs of the chosen and rejected responses, rc, rr the
    reference's, and Lc, Lr the response lengths in tokens. It is DPO derived for the reward r(x, y) -
    alpha * |y|: when the chosen response is the longer one, part of its preference is credited to its
    length, so the policy is pushed less to make long answers likelier; a shorter chosen response is pushed
    more. The offset is outside beta, as in the paper and sail-sg/oat's ``len_reg_alpha`` (which writes it
    as beta * (margin + alpha / beta * (Lc - Lr))).

    Hyperparameters: ``beta`` (default 0.1) as in DPO; ``alpha`` (default 0.05, >= 0) the length weight, and
    ``alpha: 0`` is prefopt's ``dpo``. The alpha values of Park et al. were not confirmed; the default is
    the smallest of the R-DPO grid in the SimPO paper (arXiv:2405.14734). Not in TRL. The rewards are
    DPO's, beta * (p - r), without the length term.
    """

    name = "rdpo"
    Config = RDPOConfig
    paper = "Park et al. 2024, Disentangling Length from Quality in Direct Preference Optimization, arXiv:2403.19159"

    def __call__(self, logps: PairLogps) -> LossOutput:
        beta, alpha = self.config.beta, self.config.alpha
        margin = logps.logratio_margin
        length_offset = alpha * (logps.chosen_tokens - logps.rejected_tokens)
        loss = -F.logsigmoid(beta * margin + length_offset)
        chosen_rewards, rejected_rewards = dpo_rewards(beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards, metrics={"length_offset": length_offset.detach()})


@hookimpl
def prefopt_register_losses():
    return [RDPO]
