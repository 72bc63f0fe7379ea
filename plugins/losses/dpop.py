"""DPOP (DPO-Positive, Smaug): DPO with a penalty, inside the sigmoid, for lowering the chosen likelihood."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class DPOPConfig(LossConfig):
    beta: float = Field(
        0.3,
        gt=0,
        description="Scale of the whole sigmoid argument, margin and penalty alike (typical 0.1-0.5). 0.3 is "
        "the value reported for the paper's runs; prefopt's dpo defaults to 0.1.",
    )
    lam: float = Field(
        50.0,
        ge=0,
        description="The paper's lambda (a Python keyword, hence the name): weight of the penalty "
        "max(0, rc - pc) on the chosen log-prob falling below the reference's (typical 5-500; the paper "
        "reports little change across that range). 50 is the paper's value; 0 gives plain DPO.",
    )


class DPOP(PreferenceLoss):
    """DPO-Positive: DPO whose margin is cut by lam * max(0, rc - pc) inside the sigmoid.

    Pal, Karkhanis, Dooley, Roberts, Naidu, White (2024), "Smaug: Fixing Failure Modes of Preference
    Optimisation with DPO-Positive", arXiv:2402.13228.

    Loss, per pair (Section 4, eq. 3):
        L = -log sigmoid(beta * ((pc - rc) - (pr - rr) - lam * max(0, rc - pc)))
    where pc, pr are the policy's summed log-probs of the chosen and rejected responses and rc, rr the
    reference's. DPO is satisfied once the chosen response is *relatively* likelier than the rejected one,
    and on pairs that differ in a few tokens it can lower both. The penalty is zero while the chosen
    log-ratio pc - rc is non-negative and grows linearly once it goes negative, which stops exactly that.
    It sits inside the sigmoid and is scaled by beta, as in the paper and in the code releases that follow
    it (sail-sg/oat ``dpo_positive_lambda``, PaddleNLP ``dpop_lambda``); some ports add the penalty
    *outside* the log-sigmoid instead, which is a different objective.

    Hyperparameters: ``beta`` (default 0.3) scales the whole argument; ``lam`` (the paper's lambda,
    default 50) weighs the penalty, and ``lam: 0`` is prefopt's ``dpo``. Both defaults come from code
    releases and a summary of the paper, not from its text. Not in TRL. The rewards are DPO's,
    beta * (p - r); the metric ``penalty`` is max(0, rc - pc), averaged over pairs.
    """

    name = "dpop"
    Config = DPOPConfig
    paper = (
        "Pal et al. 2024, Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive, "
        "arXiv:2402.13228"
    )

    def __call__(self, logps: PairLogps) -> LossOutput:
        beta, lam = self.config.beta, self.config.lam
        margin = logps.logratio_margin
        penalty = torch.relu(logps.ref_chosen - logps.policy_chosen)
        loss = -F.logsigmoid(beta * (margin - lam * penalty))
        chosen_rewards, rejected_rewards = dpo_rewards(beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards, metrics={"penalty": penalty.detach()})


@hookimpl
def prefopt_register_losses():
    return [DPOP]
