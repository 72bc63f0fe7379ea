"""KTO, Kahneman-Tversky optimization: a prospect-theoretic loss on unpaired, labelled completions."""

from __future__ import annotations

import torch
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, hookimpl


class KTOConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="Scale of the log-ratio inside the value function (typical 0.01-0.5); as in DPO, smaller "
        "lets the policy move further from the reference. 0.1 is the paper's and TRL's default.",
    )
    desirable_weight: float = Field(
        1.0,
        gt=0,
        description="lambda_D, the weight of each desirable example's loss. With unbalanced data TRL, citing the "
        "paper's eq. 8, suggests lambda_D * n_D / (lambda_U * n_U) in [1, 1.33] (n_D, n_U: example counts).",
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="lambda_U, the weight of each undesirable example's loss."
    )


class KTO(PreferenceLoss):
    """Kahneman-Tversky Optimization: unpaired desirable/undesirable completions against a KL reference point.

    Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela (2024), "KTO: Model Alignment as Prospect Theoretic
    Optimization", ICML 2024, arXiv:2402.01306.

    Each example is one completion y for a prompt x, labelled desirable or undesirable; no pair is
    needed (paired data is split into one example of each). With r = pc - rc, the policy-to-reference
    log-ratio of the example's own completion (summed over its tokens), the loss is

        desirable:    lambda_D * (1 - sigmoid(beta * (r - z0)))
        undesirable:  lambda_U * (1 - sigmoid(beta * (z0 - r)))

    The reference point z0 = max(0, mean over the micro-batch of (pr - rr)) estimates KL(policy ||
    reference): pr - rr is the log-ratio of a *mismatched* completion, another example's, after this
    example's prompt (``prefopt.data.unpaired``). z0 is detached, so it shifts the loss but passes no
    gradient, and the loss is saturating: an example already far on the right side of z0 costs little.
    Intuition: raise the reward of desirable completions above what the policy gives a random
    completion, and push undesirable ones below it.

    Returns per-example losses in batch order (their mean is TRL's loss), ``chosen_rewards`` =
    beta * r for every example (the metrics average them over desirable and undesirable examples
    separately, as TRL logs them), ``rejected_rewards`` = beta * (pr - rr) of the mismatched
    completions, and the metric ``kl`` (z0). Equals TRL 1.16 ``KTOTrainer(loss_type="kto")``.

    Batch-level: z0 averages over the micro-batch the engine gives the loss (``train.micro_batch_size``
    examples on one process, ``eval.batch_size`` in evaluation). TRL averages its per-device batch and
    then gathers that mean across processes; prefopt does not gather (the engine has no collective hook
    for losses), so under several processes each one uses its own micro-batch's z0. One example per
    micro-batch makes z0 a single mismatched sample: noisy, but still not the example's own reward, as
    it would be in TRL with a per-device batch of one (which TRL refuses).
    """

    name = "kto"
    Config = KTOConfig
    paper = "Ethayarajh et al. 2024, KTO: Model Alignment as Prospect Theoretic Optimization, arXiv:2402.01306"
    unpaired = True

    def __call__(self, logps: PairLogps) -> LossOutput:
        if logps.labels is None:
            raise ValueError("kto trains on unpaired examples: PairLogps.labels must say which are desirable")
        beta = self.config.beta
        reward = logps.chosen_logratios
        mismatched = logps.rejected_logratios
        # The reference point passes no gradient (TRL computes these log-probs under no_grad).
        z0 = mismatched.detach().mean().clamp(min=0)
        desirable = self.config.desirable_weight * (1 - torch.sigmoid(beta * (reward - z0)))
        undesirable = self.config.undesirable_weight * (1 - torch.sigmoid(beta * (z0 - reward)))
        loss = torch.where(logps.labels, desirable, undesirable)
        return LossOutput(loss, beta * reward.detach(), beta * mismatched.detach(), metrics={"kl": z0})


@hookimpl
def prefopt_register_losses():
    return [KTO]
