"""BCO (pairwise): each response's implicit reward classified against a running reward shift delta."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl


class BCOPairConfig(LossConfig):
    beta: float = Field(
        0.01,
        gt=0,
        description="Scale of the implicit rewards beta * (p - r) (the classifier's logits). 0.01 is the "
        "paper's per the TRL index; TRL's default is 0.1.",
    )
    running_shift: bool = Field(
        True,
        description="Classify rewards against delta, the running mean of training rewards (the paper; TRL "
        "<= 0.28). False fixes delta = 0, as TRL >= 0.29's bco_pair does.",
    )


class BCOPair(PreferenceLoss):
    """Binary classifier optimization, pairwise: chosen reward above delta, rejected reward below it.

    Jung, Han, Nam, On (2024), "Binary Classifier Optimization for Large Language Model Alignment",
    arXiv:2404.04656.

    Loss, per pair, with the implicit rewards sc = beta * (pc - rc), sr = beta * (pr - rr):
        L = -log sigmoid(sc - delta) - log sigmoid(-(sr - delta))
    A logistic classifier whose logit is the implicit reward: chosen responses are the positive class,
    rejected ones the negative. The paper shows that this binary cross-entropy upper-bounds the DPO loss,
    and introduces the reward shift delta, the mean of the rewards seen so far, to narrow the gap; the same
    classifier is what lets BCO learn from unpaired thumbs-up/down data.

    Running state. delta is the mean of the per-micro-batch mean rewards mean(sc, sr) over every training
    micro-batch so far (each micro-batch counts once, as TRL <= 0.28's ``RunningMoments`` fed one value per
    loss call); the current micro-batch is included before the loss is computed, and delta carries no
    gradient. It is updated only by training forwards, recognized as gradient mode on and policy log-probs
    that carry gradient: the engine evaluates under ``torch.no_grad()``, so evaluation reads delta without
    moving it (TRL <= 0.28 also updated it on evaluation batches). It is saved with checkpoints
    (``state_dict``: delta and the number of micro-batches averaged), so a resumed run continues the same
    average. Each process averages its own micro-batches (TRL <= 0.28 gathered them across processes), and
    checkpoints keep the main process's.

    Hyperparameters: ``beta`` (> 0, default 0.01, the paper's per the TRL index; TRL's default is 0.1);
    ``running_shift`` (default True; False is TRL >= 0.29's ``bco_pair``, which is NCA's "biased NCA").

    TRL: ``DPOTrainer(loss_type="bco_pair")`` kept delta up to v0.28; the v0.29 rewrite dropped it, so TRL
    1.16 computes this loss with delta = 0 (``running_shift=False`` equals it). Shifting both reference
    log-probs by delta / beta turns TRL 1.16's loss into this one, which is how the tests check it.
    Rewards are DPO's, beta * (p - r) (unshifted). ``metrics["delta"]`` is the delta this batch used.
    """

    name = "bco_pair"
    Config = BCOPairConfig
    paper = "Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment, arXiv:2404.04656"

    def __init__(self, config: BCOPairConfig) -> None:
        super().__init__(config)
        # Kept as a tensor on the batch's device, so updating it never waits for the accelerator.
        self.delta: Tensor = torch.zeros((), dtype=torch.float64)
        self.batches = 0

    def __call__(self, logps: PairLogps) -> LossOutput:
        beta = self.config.beta
        chosen = beta * logps.chosen_logratios
        rejected = beta * logps.rejected_logratios
        if self.config.running_shift:
            # Only training forwards move the shift: the engine marks evaluation with loss.train(False), and a
            # forward without gradients (a probe of the current margins) is not a training step either.
            if self.training and torch.is_grad_enabled() and logps.policy_chosen.requires_grad:
                batch_mean = torch.cat([chosen, rejected]).detach().mean().to(torch.float64)
                self.batches += 1
                self.delta = self.delta.to(batch_mean.device)
                self.delta = self.delta + (batch_mean - self.delta) / self.batches
            delta = self.delta.to(device=chosen.device, dtype=chosen.dtype)
        else:
            delta = torch.zeros((), dtype=chosen.dtype, device=chosen.device)
        loss = -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))
        chosen_rewards, rejected_rewards = dpo_rewards(beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards, {"delta": delta.detach()})

    def state_dict(self) -> dict[str, Any]:
        if not self.config.running_shift:
            return {}
        return {"delta": float(self.delta), "batches": self.batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self.config.running_shift:
            return super().load_state_dict(state)
        if set(state) != {"delta", "batches"}:
            raise ValueError(f"loss {self.name!r} expects state keys ['batches', 'delta'], got {sorted(state)}")
        self.delta = torch.tensor(float(state["delta"]), dtype=torch.float64)
        self.batches = int(state["batches"])


@hookimpl
def prefopt_register_losses():
    return [BCOPair]
