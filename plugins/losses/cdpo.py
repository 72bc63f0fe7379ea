"""cDPO, conservative DPO: DPO's sigmoid loss against soft labels, for preferences flipped at rate epsilon."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class CDPOConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the KL tie to the reference, as in DPO (typical 0.01-0.5); 0.1 is TRL's and "
        "HALOs' default.",
    )
    epsilon: float = Field(
        0.2,
        ge=0,
        lt=0.5,
        description="Assumed probability that a pair's label is flipped, in [0, 0.5); 0 is plain DPO. 0.2 is "
        "HALOs' default; TRL <= 0.28 called it `label_smoothing` (default 0) and TRL >= 0.29 has no cDPO.",
    )


class CDPO(PreferenceLoss):
    """Conservative DPO: binary cross-entropy of the DPO margin toward the soft target 1 - epsilon.

    Eric Mitchell (2023), "A note on DPO with noisy preferences & relationship to IPO", technical note
    (ericmitchell.ai/cdpo.pdf, Eq. 3; not on arXiv), on DPO of Rafailov et al. (2023), arXiv:2305.18290.

    Loss, per pair:  L = (1 - eps) * -log sigmoid(h) + eps * -log sigmoid(-h),   h = beta * ((pc - rc) - (pr - rr))
    If each label is wrong with probability eps, the probability that the chosen response really is better
    is 1 - eps, and L is the cross-entropy of the model's sigmoid(h) against that soft label. Its minimum is
    at h = log((1 - eps) / eps), so unlike DPO it stops pushing the margin once it gets there: the implicit
    rewards cannot run away on pairs the data cannot vouch for. Since -log sigmoid(-h) = -log sigmoid(h) + h,
    L = DPO + eps * h.

    Hyperparameters: ``beta`` (> 0, default 0.1, as TRL and HALOs); ``epsilon`` in [0, 0.5) (default 0.2,
    HALOs' `config/loss/cdpo.yaml`); epsilon = 0 is DPO exactly.

    TRL: ``DPOTrainer(loss_type="sigmoid", label_smoothing=eps)`` up to v0.28 computed this loss; from v0.29
    ``label_smoothing`` no longer applies to ``"sigmoid"`` and cDPO cannot be expressed. TRL 1.16 still runs
    the same formula in ``loss_type="aot"``, which on a one-pair batch (sorting one value changes nothing) is
    exactly this loss; the tests check it there. Rewards are DPO's, beta * (p - r).
    """

    name = "cdpo"
    Config = CDPOConfig
    paper = "Mitchell 2023, A note on DPO with noisy preferences (cDPO), on DPO arXiv:2305.18290"

    def __call__(self, logps: PairLogps) -> LossOutput:
        eps = self.config.epsilon
        margin = logps.logratio_margin
        h = self.config.beta * margin
        loss = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards)


@hookimpl
def prefopt_register_losses():
    return [CDPO]
