"""Cal-DPO: a beta-free Bradley-Terry term plus squares that calibrate the log-ratios to +-1/(2 beta)."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class CalDPOConfig(LossConfig):
    beta: float = Field(
        0.001,
        gt=0,
        description="Sets the calibration targets +-1/(2 beta) of the chosen and rejected log-ratios, so a "
        "smaller beta asks for larger log-ratios; it does not scale the Bradley-Terry term. 0.001 is the "
        "official run script's (its YAML config says 0.002); far below dpo's usual 0.1.",
    )


class CalDPO(PreferenceLoss):
    """Calibrated DPO: -log sigmoid(Dc - Dr) + (Dc - 1/(2 beta))^2 / 2 + (Dr + 1/(2 beta))^2 / 2.

    Xiao, Yuan, Zhu, Li, Honavar (2024), "Cal-DPO: Calibrated Direct Preference Optimization for Language
    Model Alignment", NeurIPS 2024, arXiv:2412.14516.

    Loss, per pair, as in the official code (tengxiao1/Cal-DPO ``scripts/dpo_trainer.py``,
    ``loss_type == "Cal-DPO"``):
        L = -log sigmoid(Dc - Dr) + 1/2 * [(Dc - 1/(2 beta))^2 + (Dr + 1/(2 beta))^2]
    with the log-ratios Dc = pc - rc and Dr = pr - rr of the summed policy (pc, pr) and reference (rc, rr)
    log-probs of the chosen and rejected responses. DPO only constrains the difference Dc - Dr, so both
    log-ratios may fall together; the squares pin them to an absolute scale, the chosen one at +1/(2 beta)
    and the rejected one at -1/(2 beta) (the calibration term is half of TRL's ``sppo_hard`` loss). The
    Bradley-Terry term has no beta. The official code takes each square's batch mean (``F.mse_loss``) and
    adds it to the mean of the Bradley-Terry term; the per-pair form here has the same mean. Whether the
    paper's equation has the 1/2 and omits beta from the first term was not checked against its text.

    Hyperparameter: ``beta`` (default 0.001, the official run script's). Not in TRL. The rewards are DPO's,
    beta * (p - r), for comparison with the other losses; the official code logs the raw policy log-probs
    pc, pr instead, which prefopt logs anyway as ``logps/*``. The metric ``calibration`` is the squares
    term.
    """

    name = "cal_dpo"
    Config = CalDPOConfig
    paper = "Xiao et al. 2024, Cal-DPO: Calibrated Direct Preference Optimization, arXiv:2412.14516"

    def __call__(self, logps: PairLogps) -> LossOutput:
        target = 1.0 / (2.0 * self.config.beta)
        chosen_ratio = logps.chosen_logratios
        rejected_ratio = logps.rejected_logratios
        calibration = 0.5 * ((chosen_ratio - target) ** 2 + (rejected_ratio + target) ** 2)
        loss = -F.logsigmoid(chosen_ratio - rejected_ratio) + calibration
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards, metrics={"calibration": calibration.detach()})


@hookimpl
def prefopt_register_losses():
    return [CalDPO]
