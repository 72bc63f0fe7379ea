"""DPO, the sigmoid preference loss over the policy-vs-reference log-ratio margin."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class DPOConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the KL tie to the reference (typical 0.01-0.5). Smaller lets the policy "
        "move further. The paper tunes it per task; 0.1 is the paper's and TRL's default.",
    )


class DPO(PreferenceLoss):
    """Direct Preference Optimization: -log sigmoid(beta * margin of log-ratios).

    Rafailov, Sharma, Mitchell, Ermon, Manning, Finn (2023), "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model", NeurIPS 2023, arXiv:2305.18290.

    Loss, per pair (eq. 7):  L = -log sigmoid(beta * ((pc - rc) - (pr - rr)))
    where pc, pr are the policy's summed log-probs of the chosen and rejected responses and rc, rr the
    reference's. The implicit rewards beta * (p - r) are returned for logging. Equals TRL's
    ``DPOTrainer(loss_type="sigmoid")``.
    """

    name = "dpo"
    Config = DPOConfig
    paper = "Rafailov et al. 2023, Direct Preference Optimization, arXiv:2305.18290"

    def __call__(self, logps: PairLogps) -> LossOutput:
        margin = logps.logratio_margin
        loss = -F.logsigmoid(self.config.beta * margin)
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards)


@hookimpl
def prefopt_register_losses():
    return [DPO]
