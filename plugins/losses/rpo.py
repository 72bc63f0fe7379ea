"""RPO: DPO plus alpha times the negative log-likelihood of the chosen responses."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class RPOConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the KL tie to the reference in the DPO term (typical 0.01-0.5); 0.1 is TRL's "
        "default.",
    )
    alpha: float = Field(
        1.0,
        ge=0,
        description="Weight of the NLL term; 0 is DPO. 1.0 is Pang et al.'s; TRL's equivalent is the weight of "
        "`sft` in `loss_weights` (classic `rpo_alpha`, default None, off).",
    )


class RPO(PreferenceLoss):
    """DPO + alpha * NLL of the chosen responses, the NLL a token mean over the batch's chosen tokens.

    Pang, Yuan, Cho, He, Sukhbaatar, Weston (2024), "Iterative Reasoning Preference Optimization", NeurIPS
    2024, arXiv:2404.19733; the same objective is analysed by Liu et al. (2024), "Provably Mitigating
    Overoptimization in RLHF: Your SFT Loss is Implicitly an Adversarial Regularizer", arXiv:2405.16436.

    Loss, per micro-batch of B pairs:
        mean_i -log sigmoid(beta * m_i)  +  alpha * (-sum_i pc_i) / (sum_i Lc_i)
    with m_i DPO's margin, pc_i the policy's summed log-prob of chosen response i and Lc_i its token count.
    DPO can raise the margin while lowering the chosen response's likelihood; the NLL term keeps that
    likelihood up (Pang et al. find it essential on reasoning tasks), and Liu et al. show it acts as a
    regularizer against reward over-optimization.

    Per-pair form. prefopt losses return one value per pair and the engine averages them, so the NLL, a
    mean over all chosen tokens of the micro-batch, is split into per-pair shares: pair i carries
        L_i = -log sigmoid(beta * m_i) + alpha * (-pc_i) * B / (sum_j Lc_j),
    each pair's summed NLL over the batch's mean chosen length, whose mean over the B pairs is exactly the
    formula above. With gradient accumulation the engine averages these shares over the optimizer step's
    pairs, so the step's NLL is the pair-weighted mean of the micro-batches' token means, not one token mean
    over the whole step (which the loss cannot see). With equal micro-batches that is the plain mean of
    the micro-batch token means, as a trainer that averages micro-batch losses (TRL's) accumulates them.

    Hyperparameters: ``beta`` (> 0, default 0.1 as TRL); ``alpha`` (>= 0, default 1.0, Pang et al.'s).

    Equals TRL >= 0.29's ``DPOTrainer(loss_type=["sigmoid", "sft"], loss_weights=[1, alpha])`` on a micro-
    batch (TRL <= 0.28: ``rpo_alpha=alpha``, the same token mean; it also dropped tokens with id 0). Rewards
    are DPO's, beta * (p - r). ``metrics["nll"]`` is the micro-batch's token-mean NLL and
    ``metrics["dpo"]`` the DPO term per pair.
    """

    name = "rpo"
    Config = RPOConfig
    paper = "Pang et al. 2024, Iterative Reasoning Preference Optimization, arXiv:2404.19733"

    def __call__(self, logps: PairLogps) -> LossOutput:
        margin = logps.logratio_margin
        dpo = -F.logsigmoid(self.config.beta * margin)
        # Each pair's share of the token-mean NLL: its summed NLL over the batch's mean chosen length.
        mean_length = logps.chosen_tokens.sum().clamp(min=1) / logps.chosen_tokens.numel()
        nll = -logps.policy_chosen / mean_length
        loss = dpo + self.config.alpha * nll
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        metrics = {"nll": nll.detach().mean(), "dpo": dpo.detach()}
        return LossOutput(loss, chosen_rewards, rejected_rewards, metrics)


@hookimpl
def prefopt_register_losses():
    return [RPO]
