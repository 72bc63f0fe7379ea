"""EXO (pairwise): the reverse KL from the model's preference distribution to the label's, for K = 2 responses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class EXOPairConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="Scale of the log-ratio margin inside the model's preference distribution (the paper's "
        "beta_pi); 0.1 is TRL's default and the value the TRL paper index gives. The official code uses 0.5.",
    )
    epsilon: float = Field(
        1e-3,
        gt=0,
        lt=0.5,
        description="Probability the target distribution puts on the rejected response, in (0, 0.5); it must "
        "be positive, since log(epsilon) enters the loss. 1e-3 is the paper's recommendation per TRL's docs; "
        "TRL's `label_smoothing` defaults to 0, which its EXO refuses.",
    )


class EXOPair(PreferenceLoss):
    """Efficient exact optimization, pairwise: KL(q || p) of sigmoid(beta * margin) against (1 - eps, eps).

    Ji, Lu, Niu, Ke, Wang, Zhu, Tang, Huang (2024), "Towards Efficient Exact Optimization of Language Model
    Alignment", ICML 2024, arXiv:2402.00856 (EXO-pref, Eq. 16, K = 2).

    Loss, per pair, with h = beta * ((pc - rc) - (pr - rr)) and q = sigmoid(h):
        L = q * (log q - log(1 - eps)) + (1 - q) * (log(1 - q) - log eps)
    The model's distribution over {chosen, rejected} is q = (sigmoid(h), sigmoid(-h)); the label's is
    p = (1 - eps, eps). DPO minimizes the forward KL(p || q) (for eps = 0, its cross-entropy), which is
    mean-seeking; EXO minimizes the reverse KL(q || p), mode-seeking like the KL-regularized RL objective
    itself, and the paper proves it optimizes in the same direction as RL for any policy parametrization.
    Its minimum, 0, is at h = log((1 - eps) / eps).

    Hyperparameters: ``beta`` (> 0, default 0.1 as TRL); ``epsilon`` in (0, 0.5) (default 1e-3, the paper's
    recommendation per TRL's docs; the official code's log-targets 0 and -10 amount to eps ~ 4.5e-5).

    Equals TRL's ``DPOTrainer(loss_type="exo_pair", label_smoothing=eps)`` (contributed by the first author).
    Only the pairwise form; the paper's K > 2 version with reward-softmax targets is not implemented.
    Rewards are DPO's, beta * (p - r).
    """

    name = "exo_pair"
    Config = EXOPairConfig
    paper = "Ji et al. 2024, Towards Efficient Exact Optimization of Language Model Alignment, arXiv:2402.00856"

    def __call__(self, logps: PairLogps) -> LossOutput:
        eps = self.config.epsilon
        margin = logps.logratio_margin
        h = self.config.beta * margin
        # log q from logsigmoid, not log(sigmoid(h)), so a confident q never becomes log 0.
        loss = torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-eps)) + torch.sigmoid(-h) * (
            F.logsigmoid(-h) - math.log(eps)
        )
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards)


@hookimpl
def prefopt_register_losses():
    return [EXOPair]
