"""WPO: DPO with each pair weighted by how likely the current policy is to generate both of its responses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class WPOConfig(LossConfig):
    beta: float = Field(
        0.01,
        gt=0,
        description="Strength of the KL tie to the reference in the DPO term (typical 0.01-0.5). 0.01 is the "
        "official WPO configs' (Mistral and Llama-3 runs); TRL's default is 0.1.",
    )
    clamp: bool = Field(
        True,
        description="Cap the pair weight w(yc) * w(yr) at 1, as the official code (wzhouad/WPO run_wpo.py) and "
        "TRL <= 0.28 do. False leaves it uncapped, as TRL >= 0.29 does; a weight can then exceed 1 when the "
        "policy puts more mass on the response's tokens than its own sampling would on average.",
    )


def sequence_log_weights(token_logps: Tensor, token_log_collision: Tensor, mask: Tensor) -> Tensor:
    """log w(y) per row: the mean over response tokens of log p_t - log sum_v p_v^2, detached.

    sum_v p_v^2 is the expected probability of a token the policy samples from its own next-token distribution,
    so a token weight of 0 means "as probable as the policy's own samples are on average": the weight measures
    how on-policy the response is, not how peaked or flat the distributions happen to be. A row with no
    response tokens gets log-weight 0 (weight 1), as TRL does, rather than 0/0.
    """
    with torch.no_grad():  # a weight on the loss, never a path for gradients (the paper's stop-gradient)
        mask = mask.to(token_logps.dtype)
        aligned = (token_logps.detach() - token_log_collision) * mask
        return aligned.sum(-1) / mask.sum(-1).clamp(min=1)


class WPO(PreferenceLoss):
    """Weighted Preference Optimization: DPO's loss times the detached weight w(yc) * w(yr) of each pair.

    Zhou, Agrawal, Zhang, Indurthi, Zhao, Song, Xu, Zhu (2024), "WPO: Enhancing RLHF with Weighted Preference
    Optimization", EMNLP 2024, arXiv:2406.11827.

    Loss, per pair:  L = w(yc) * w(yr) * -log sigmoid(beta * m),
        w(y) = exp(mean over response tokens t of [log p_t - log sum_v p_v^2])
    with m DPO's margin (pc - rc) - (pr - rr), p_t the policy's probability of response token t and p_v its
    whole next-token distribution at t. Preference data is usually sampled from other models (off-policy);
    WPO re-weights each pair by how probable the current policy finds it, so the loss approximates on-policy
    DPO without sampling. The per-token normaliser sum_v p_v^2 ("sampling-aligned" weights, the paper's
    eq. 2 as implemented by the authors and TRL) keeps the weights from shrinking merely because the
    distributions are flat. Weights are recomputed every forward from the current policy and detached.

    Hyperparameters: ``beta`` (> 0, default 0.01, the official configs'); ``clamp`` (default True, the
    official code's ``clamp(exp(.), max=1)``; False is TRL >= 0.29's uncapped weight).

    Needs per-token log-probs and log sum_v p_v^2 at each response position (``requires_token_log_collision``):
    one more log-sum-exp over the vocabulary per token.

    Equals TRL >= 0.29's ``DPOTrainer(loss_type="sigmoid", use_weighting=True)`` with ``clamp=False``; with
    ``clamp=True`` it is the official code's loss (TRL <= 0.28's ``use_weighting``). Rewards are DPO's,
    beta * (p - r), unweighted. ``metrics["weight"]`` is the pair weight actually applied.
    """

    name = "wpo"
    Config = WPOConfig
    paper = "Zhou et al. 2024, WPO: Enhancing RLHF with Weighted Preference Optimization, arXiv:2406.11827"
    requires_token_log_collision = True

    def __call__(self, logps: PairLogps) -> LossOutput:
        margin = logps.logratio_margin
        dpo = -F.logsigmoid(self.config.beta * margin)
        log_weight = sequence_log_weights(
            logps.policy_chosen_token_logps, logps.policy_chosen_token_log_collision, logps.chosen_mask
        ) + sequence_log_weights(
            logps.policy_rejected_token_logps, logps.policy_rejected_token_log_collision, logps.rejected_mask
        )
        # exp of the summed logs, as the official code: a huge and a tiny weight cannot overflow before they cancel.
        weight = torch.exp(log_weight)
        if self.config.clamp:
            weight = weight.clamp(max=1)
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        return LossOutput(weight * dpo, chosen_rewards, rejected_rewards, {"weight": weight})


@hookimpl
def prefopt_register_losses():
    return [WPO]
