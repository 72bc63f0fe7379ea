"""Length-normalized DPO: DPO on per-token average log-ratios, so long responses earn no larger margin."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class DPONormConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the KL tie to the reference. The margin is per token, so useful values are "
        "larger than DPO's (public Tulu 3 configs use about 5, not confirmed from the paper); 0.1 is TRL's "
        "default.",
    )


class DPONorm(PreferenceLoss):
    """Length-normalized DPO: -log sigmoid(beta * ((pc - rc)/Lc - (pr - rr)/Lr)).

    Lambert et al. (2024), "Tulu 3: Pushing Frontiers in Open Language Model Post-Training",
    arXiv:2411.15124; also the "DPO w/ LN" ablation of SimPO (Meng, Xia, Chen 2024, arXiv:2405.14734).

    Loss, per pair:  L = -log sigmoid(beta * ((pc - rc)/Lc - (pr - rr)/Lr))
    with Lc, Lr the responses' token counts (at least 1). Summed log-ratios grow with length, so DPO can
    raise the margin by favouring long chosen responses; averaging per token removes that lever. Unlike
    SimPO it keeps the reference and has no target margin.

    Hyperparameters: ``beta`` (> 0, default 0.1 as TRL; the per-token margin is small, so larger values,
    about 5 in public Tulu 3 configs, are common).

    Equals TRL's ``DPOTrainer(loss_type="sigmoid_norm")`` (TRL >= 1.4). Rewards are DPO's, beta * (p - r)
    with summed log-ratios, as TRL logs them.
    """

    name = "dpo_norm"
    Config = DPONormConfig
    paper = "Lambert et al. 2024, Tulu 3: Pushing Frontiers in Open Language Model Post-Training, arXiv:2411.15124"

    def __call__(self, logps: PairLogps) -> LossOutput:
        chosen = logps.chosen_logratios / logps.chosen_tokens.clamp(min=1)
        rejected = logps.rejected_logratios / logps.rejected_tokens.clamp(min=1)
        loss = -F.logsigmoid(self.config.beta * (chosen - rejected))
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards)


@hookimpl
def prefopt_register_losses():
    return [DPONorm]
