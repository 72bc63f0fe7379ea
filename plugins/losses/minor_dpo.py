"""Minor DPO: DPO whose rejected log-ratio is clamped at zero from below."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class MinorDPOConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the KL tie to the reference, as in dpo (typical 0.01-0.5); 0.1 as in dpo. "
        "The method adds no other hyperparameter.",
    )


class MinorDPO(PreferenceLoss):
    """Minor DPO: -log sigmoid(beta * ((pc - rc) - max(0, pr - rr))).

    Xie, Chen et al. (2024), "Minor DPO reject penalty to increase training robustness", arXiv:2408.09834.

    Loss, per pair:  L = -log sigmoid(beta * ((pc - rc) - max(0, pr - rr)))
    where pc, pr are the policy's summed log-probs of the chosen and rejected responses and rc, rr the
    reference's. While the rejected response is likelier under the policy than under the reference
    (pr > rr) this is DPO; once the policy has pushed it below the reference, the rejected term is 0 and
    gives no gradient, so the loss stops driving the rejected likelihood down without bound, as DPO does,
    and only the chosen term keeps learning. The paper motivates the clamp by aligning DPO's behaviour in
    beta with the KL-regularized RL objective's. The formula is confirmed only from a third-party
    reimplementation citing the paper, not from its text.

    Hyperparameters: ``beta`` (default 0.1), as in DPO; nothing else. Not in TRL. The rewards are DPO's,
    beta * (p - r), unclamped.
    """

    name = "minor_dpo"
    Config = MinorDPOConfig
    paper = "Xie et al. 2024, Minor DPO reject penalty to increase training robustness, arXiv:2408.09834"

    def __call__(self, logps: PairLogps) -> LossOutput:
        chosen_ratio = logps.chosen_logratios
        rejected_ratio = logps.rejected_logratios
        loss = -F.logsigmoid(self.config.beta * (chosen_ratio - torch.relu(rejected_ratio)))
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards)


@hookimpl
def prefopt_register_losses():
    return [MinorDPO]
