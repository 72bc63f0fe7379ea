"""DiscoPOP (log-ratio modulated loss): a sigmoid gate that blends DPO's logistic loss with an exponential one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class DiscoPOPConfig(LossConfig):
    beta: float = Field(
        0.05,
        gt=0,
        description="Strength of the KL tie to the reference, as in DPO. 0.05 is the paper's (per the TRL "
        "index); TRL's default is 0.1.",
    )
    tau: float = Field(
        0.05,
        gt=0,
        description="Temperature of the gate sigmoid(beta * margin / tau): smaller switches more sharply "
        "between the two losses. 0.05 is the paper's (hard-coded in the official code) and TRL's "
        "`discopop_tau` default.",
    )


class DiscoPOP(PreferenceLoss):
    """DiscoPOP: (1 - g) * logistic loss + g * exponential loss, gated by g = sigmoid(beta * margin / tau).

    Lu, Holt, Fanconi, Chan, Foerster, van der Schaar, Lange (2024), "Discovering Preference Optimization
    Algorithms with and for Large Language Models", NeurIPS 2024, arXiv:2406.08414 (Eq. 5, LRML).

    Loss, per pair, with rho = beta * ((pc - rc) - (pr - rr)) and g = sigmoid(rho / tau):
        L = (1 - g) * -log sigmoid(rho) + g * exp(-rho)
    Found by an LLM-driven search over loss functions. Where the policy already prefers the chosen response
    (rho > 0) the gate moves the weight to the exponential loss; where it does not, the logistic loss
    dominates. Unlike DPO's, the blend is not convex, nor even monotone, in rho: its slope at rho = 0 is
    (1 - log 2) / (4 tau) - 3/4, positive for tau < (1 - log 2)/3 ~ 0.10 (+0.784 at tau = 0.05). A pair at
    zero margin, as every pair is at the first step when the policy is the reference, is therefore pushed
    toward a local minimum at a small negative margin; at tau = 0.05 the gradient raises the margin only
    for rho below ~ -0.12 or above ~ +0.07 (a local maximum), and lowers it in between.

    Hyperparameters: ``beta`` (> 0, default 0.05, the paper's; TRL's default is 0.1); ``tau`` (> 0, default
    0.05, the paper's and TRL's).

    Equals TRL's ``DPOTrainer(loss_type="discopop")`` (identical to the official ``log_ratio_modulated_loss``)
    wherever TRL's value is finite. The exponential term is computed as exp(log g - rho) instead of
    g * exp(-rho): for a very negative margin exp(-rho) overflows (below rho ~ -88 in float32) and TRL's
    0 * inf becomes NaN, while g * exp(-rho) itself tends to 0 when tau < 1. Rewards are DPO's,
    beta * (p - r). ``metrics["gate"]`` is g, the weight of the exponential loss.
    """

    name = "discopop"
    Config = DiscoPOPConfig
    paper = "Lu et al. 2024, Discovering Preference Optimization Algorithms with and for LLMs, arXiv:2406.08414"

    def __call__(self, logps: PairLogps) -> LossOutput:
        margin = logps.logratio_margin
        rho = self.config.beta * margin
        gate_logits = rho / self.config.tau
        logistic = torch.sigmoid(-gate_logits) * -F.logsigmoid(rho)  # (1 - g) * -log sigmoid(rho)
        exponential = torch.exp(F.logsigmoid(gate_logits) - rho)  # g * exp(-rho), without 0 * inf
        loss = logistic + exponential
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards, {"gate": torch.sigmoid(gate_logits).detach()})


@hookimpl
def prefopt_register_losses():
    return [DiscoPOP]
