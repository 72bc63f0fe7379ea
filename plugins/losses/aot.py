"""AOT, alignment via optimal transport: DPO's logistic loss on sorted quantiles of the batch, not on pairs.

Two losses share this module: ``aot`` (paired) and ``aot_unpaired``. Both are *batch-level*: the loss of
one pair depends on the other pairs in the same call, because the log-ratios are sorted across the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class AOTConfig(LossConfig):
    beta: float = Field(
        0.01,
        gt=0,
        description="Scale of the sorted log-ratio gaps inside the logistic loss, as DPO's beta (typical "
        "0.01-0.5). 0.01 is the paper's (Figure 2, per the TRL index); TRL's default is 0.1.",
    )
    epsilon: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Label smoothing of the logistic loss, in [0, 0.5): each quantile term is "
        "(1 - eps) * -log sigmoid(h) + eps * -log sigmoid(-h). 0 (the default, as TRL's) is the plain logistic "
        "surrogate. TRL calls it `label_smoothing`.",
    )


def _smoothed_logistic(h: Tensor, epsilon: float) -> Tensor:
    """(1 - eps) * -log sigmoid(h) + eps * -log sigmoid(-h): the paper's logistic surrogate of the
    dominance violation, with TRL's label smoothing."""
    return -(1 - epsilon) * F.logsigmoid(h) - epsilon * F.logsigmoid(-h)


class AOT(PreferenceLoss):
    """AOT (paired): the policy's sorted chosen-minus-rejected log-ratios must dominate the reference's.

    Melnyk, Mroueh, Belgodere, Rigotti, Nitsure, Yurochkin, Greenewald, Navratil, Ross (2024), "Distributional
    Preference Alignment of LLMs via Optimal Transport", NeurIPS 2024, arXiv:2406.05882.

    Loss, per quantile i of a batch of B pairs, with u = pc - pr and v = rc - rr sorted separately (ascending):
        L_i = (1 - eps) * -log sigmoid(beta * (u_(i) - v_(i))) + eps * -log sigmoid(-beta * (u_(i) - v_(i)))
    DPO asks every pair's policy log-ratio pc - pr to beat the reference's; AOT asks for *first-order
    stochastic dominance* of the distribution of u over the distribution of v: every quantile of the policy's
    log-ratios should lie above the same quantile of the reference's. In one dimension the optimal transport
    plan between two empirical distributions matches sorted values to sorted values, so the violation of
    dominance is measured between u_(i) and v_(i), which in general come from different pairs, and a convex
    surrogate (the logistic loss) turns it into something to minimize. A pair whose margin is poor can be
    "covered" by the rest of the batch: only the distribution has to move, not each pair.

    Worked example (beta = 1, eps = 0; l(z) = -log sigmoid(z)), three pairs:
        pair:   pc  pr  rc  rr    u = pc - pr   v = rc - rr   (DPO margin u - v)
          0     -1  -3  -2  -2        2             0               2
          1     -4  -3  -1  -4       -1             3              -4
          2     -2  -2  -3  -2        0            -1               1
        sorted u = [-1, 0, 2], sorted v = [-1, 0, 3]; gaps u_(i) - v_(i) = [0, 0, -1]
        L = [l(0), l(0), l(-1)] = [0.693147, 0.693147, 1.313262], mean 0.899852
    DPO on the same pairs would be mean(l(2), l(-4), l(1)) = 1.486113: pair 1's bad margin is not penalized as
    such. The gradient flows through the sort: the first quantile's term moves pair 1 (the smallest u).

    The batch. The engine calls a loss once per micro-batch, so the sort runs over the ``train.micro_batch_size``
    pairs of one process (``eval.batch_size`` while evaluating); TRL sorts over its per-device batch
    (``per_device_train_batch_size``), which is likewise what one loss call sees under gradient accumulation.
    The loss therefore depends on the micro-batch size, and larger is better (TRL's docs). A one-pair
    micro-batch makes AOT exactly cDPO. Entry i of the returned loss is the i-th *quantile's* term, not pair
    i's: only its mean (which the engine takes) means anything.

    Hyperparameters: ``beta`` (> 0, default 0.01, the paper's per the TRL index; TRL's default is 0.1);
    ``epsilon`` in [0, 0.5) (default 0, TRL's ``label_smoothing``).

    TRL: ``DPOTrainer(loss_type="aot")``, added by the paper's first author; equal to TRL 1.16 (tested).
    Rewards are DPO's, beta * (p - r), per pair and unsorted, as TRL logs them.
    """

    name = "aot"
    Config = AOTConfig
    paper = "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport, arXiv:2406.05882"

    def __call__(self, logps: PairLogps) -> LossOutput:
        # Sorting is differentiable: each sorted entry carries the gradient back to the pair it came from.
        policy_sorted, _ = torch.sort(logps.policy_chosen - logps.policy_rejected, dim=0)
        reference_sorted, _ = torch.sort(logps.ref_chosen - logps.ref_rejected, dim=0)
        loss = _smoothed_logistic(self.config.beta * (policy_sorted - reference_sorted), self.config.epsilon)
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards)


class AOTUnpaired(PreferenceLoss):
    """AOT (unpaired): the sorted chosen log-ratios must dominate the sorted rejected log-ratios.

    Melnyk, Mroueh, Belgodere, Rigotti, Nitsure, Yurochkin, Greenewald, Navratil, Ross (2024), "Distributional
    Preference Alignment of LLMs via Optimal Transport", NeurIPS 2024, arXiv:2406.05882.

    Loss, per quantile i of a batch of B pairs, with Dc = pc - rc and Dr = pr - rr sorted separately (ascending):
        L_i = (1 - eps) * -log sigmoid(beta * (Dc_(i) - Dr_(i))) + eps * -log sigmoid(-beta * (Dc_(i) - Dr_(i)))
    The unpaired form of AOT: the implicit rewards of chosen responses, as a distribution, should dominate
    those of rejected responses, quantile by quantile. Which rejected response was written for which prompt
    never enters, so the loss applies to thumbs-up / thumbs-down data with no pairing (here the engine still
    feeds pairs; shuffling the rejected side among pairs leaves the loss unchanged).

    Worked example (beta = 1, eps = 0; l(z) = -log sigmoid(z)), three pairs:
        pair:   pc  pr  rc  rr    Dc = pc - rc   Dr = pr - rr
          0     -1  -3  -2  -2         1             -1
          1     -4  -3  -1  -4        -3              1
          2     -2  -2  -3  -2         1              0
        sorted Dc = [-3, 1, 1], sorted Dr = [-1, 0, 1]; gaps Dc_(i) - Dr_(i) = [-2, 1, 0]
        L = [l(-2), l(1), l(0)] = [2.126928, 0.313262, 0.693147], mean 1.044446

    The batch, the meaning of entry i of the returned loss, and what a one-pair micro-batch gives are as for
    ``aot`` (see there): the sort runs over one process's micro-batch, TRL's over its per-device batch.

    Hyperparameters: ``beta`` (> 0, default 0.01, the paper's per the TRL index; TRL's default is 0.1);
    ``epsilon`` in [0, 0.5) (default 0, TRL's ``label_smoothing``).

    TRL: ``DPOTrainer(loss_type="aot_unpaired")`` (named ``"aot_pair"`` up to v0.27, a misleading name fixed in
    v0.28); equal to TRL 1.16 (tested). Rewards are DPO's, beta * (p - r), per pair and unsorted.
    """

    name = "aot_unpaired"
    Config = AOTConfig
    paper = "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport, arXiv:2406.05882"

    def __call__(self, logps: PairLogps) -> LossOutput:
        chosen_sorted, _ = torch.sort(logps.chosen_logratios, dim=0)
        rejected_sorted, _ = torch.sort(logps.rejected_logratios, dim=0)
        loss = _smoothed_logistic(self.config.beta * (chosen_sorted - rejected_sorted), self.config.epsilon)
        chosen_rewards, rejected_rewards = dpo_rewards(self.config.beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards)


@hookimpl
def prefopt_register_losses():
    return [AOT, AOTUnpaired]
