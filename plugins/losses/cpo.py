"""CPO: a reference-free sigmoid preference loss plus an NLL (behaviour cloning) term on the chosen response."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, chosen_nll_per_pair, hookimpl


class CPOConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="Scale of the reward beta * (summed log-prob) in the preference term (typical 0.05-0.5). "
        "0.1 is the paper's and TRL's default.",
    )
    alpha: float = Field(
        1.0,
        ge=0,
        description="Weight of the NLL term on the chosen responses (TRL's cpo_alpha). The paper adds the two "
        "terms unweighted, i.e. 1.0, also TRL's default; 0 leaves the reference-free preference term alone.",
    )


class CPO(PreferenceLoss):
    """Contrastive Preference Optimization: -log sigmoid(beta * (pc - pr)) plus alpha * NLL of the chosen.

    Xu, Sharaf, Chen, Tan, Shen, Van Durme, Murray, Kim (2024), "Contrastive Preference Optimization:
    Pushing the Boundaries of LLM Performance in Machine Translation", ICML 2024, arXiv:2401.08417.

    Loss (eq. 3 plus the behaviour-cloning term):
        L = mean_i[-log sigmoid(beta * (pc_i - pr_i))] + alpha * (-sum_i pc_i / sum_i Lc_i)
    where pc, pr are the policy's summed log-probs of the chosen and rejected responses and Lc the chosen
    length in tokens. The first term is DPO with the reference dropped (a uniform reference, the paper's
    approximation), so no reference model is run; the second keeps the policy close to the preferred data,
    which that approximation no longer does. The NLL is TRL's token mean over the micro-batch's chosen
    response tokens, returned as per-pair contributions whose mean is that value
    (``prefopt.chosen_nll_per_pair`` explains the split and how it behaves under gradient accumulation).

    Hyperparameters: ``beta`` (default 0.1) and ``alpha`` (default 1.0), both TRL's defaults. Rewards are
    beta * pc and beta * pr (summed, as in TRL); the metric ``nll`` is the micro-batch token-mean NLL.

    Equals TRL's ``CPOTrainer(loss_type="sigmoid")`` with ``cpo_alpha=alpha`` and ``label_smoothing=0``.
    TRL's ``label_smoothing``, its "hinge" and "ipo" loss types and AlphaPO's reward shaping are not
    offered; ``loss_type="simpo"`` without the NLL is prefopt's ``simpo``.
    """

    name = "cpo"
    Config = CPOConfig
    paper = "Xu et al. 2024, Contrastive Preference Optimization, arXiv:2401.08417"
    requires_reference = False

    def __call__(self, logps: PairLogps) -> LossOutput:
        beta, alpha = self.config.beta, self.config.alpha
        preference = -F.logsigmoid(beta * (logps.policy_chosen - logps.policy_rejected))
        nll, nll_mean = chosen_nll_per_pair(logps)
        loss = preference + alpha * nll
        chosen_rewards = beta * logps.policy_chosen.detach()
        rejected_rewards = beta * logps.policy_rejected.detach()
        return LossOutput(loss, chosen_rewards, rejected_rewards, metrics={"nll": nll_mean})


@hookimpl
def prefopt_register_losses():
    return [CPO]
