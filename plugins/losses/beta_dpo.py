"""beta-DPO: DPO whose beta is recalibrated every batch from the batch's margins against their running mean."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl

# The official code floors the batch beta at 1e-3 so that a batch far below the running mean cannot switch
# the loss off or flip its sign; here the floor never exceeds beta itself, so alpha = 0 is DPO for any beta.
BETA_FLOOR = 1e-3
# The Gaussian filter's z-scores are clipped here so that their squares stay finite in float64; past a few
# dozen standard deviations a pair's weight is zero in all but name anyway.
Z_LIMIT = 1e100


class BetaDPOConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="beta0, the base strength of the KL tie, which the batch rescales (typical 0.01-0.5). 0.1 is "
        "the official README's example and DPO's default.",
    )
    alpha: float = Field(
        0.6,
        ge=0,
        description="How strongly the batch's mean margin, relative to the running mean, rescales beta, per nat "
        "of margin: beta_batch = beta * (1 + alpha * (mean margin - running mean)). 0 keeps beta fixed (and with "
        "rho = 0 is plain DPO). 0.6 is the official README's example (`a`; its config default is 0).",
    )
    rho: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Fraction of each training batch filtered out, in [0, 1): floor((1 - rho) * B) pairs are "
        "kept, drawn without replacement with Gaussian weights around the running mean margin, so outliers are "
        "dropped first. 0 keeps every pair. 0.2 is the official README's example (`mode_weight`).",
    )
    momentum: float = Field(
        0.9,
        ge=0,
        lt=1,
        description="Decay of the running mean and standard deviation of the margins, in [0, 1): "
        "state <- momentum * state + (1 - momentum) * batch value. 0.9 is the official code's (fixed there).",
    )
    seed: int = Field(
        0,
        ge=0,
        description="Seed of the filter's draws. Each training batch's draw is a function of this seed and the "
        "number of training batches so far, so a resumed run draws what an unbroken one would.",
    )


class BetaDPO(PreferenceLoss):
    """beta-DPO: DPO with a batch-level beta from margin statistics and a Gaussian filter on outlier pairs.

    Wu, Xie, Yang, Wu, Gao, Ding, Wang, He (2024), "beta-DPO: Direct Preference Optimization with Dynamic
    beta", NeurIPS 2024, arXiv:2407.08639.

    Loss, over the kept pairs S of a batch of B pairs, with the margin m = (pc - rc) - (pr - rr):
        L = mean_{i in S} -log sigmoid(beta_b * m_i),  beta_b = max(beta * (1 + alpha * (mean_S m - M0)), floor)
    The paper reports that the best beta varies with how informative the pairs are. beta-DPO therefore
    rescales beta per batch by how far the batch's mean margin sits from M0, the running mean of margins:
    a batch of well-separated pairs (margins above M0) gets a larger, more conservative beta, a batch of close
    pairs a smaller, more aggressive one. It drops outlier pairs first, so a few extreme margins cannot drive
    beta_b.

    Algorithm, per training micro-batch (the official code, junkangwu/beta-DPO ``trainers.py``; the paper's
    equations were not available to check against):
      1. Update the running statistics with this batch's margins (detached), *before* the loss:
         M0 <- momentum * M0 + (1 - momentum) * mean(m),  sigma <- momentum * sigma + (1 - momentum) * std(m),
         both starting at 0 and with no bias correction; std is the unbiased (Bessel) one.
      2. Filter: keep k = max(1, floor((1 - rho) * B)) pairs drawn without replacement with probabilities
         proportional to exp(-(m_i - M0)^2 / (2 sigma^2)): typical margins stay, outliers go first.
      3. beta_b from the kept pairs' mean margin, as above; the floor is min(1e-3, beta). beta_b is detached.
      4. The loss is the mean of DPO's loss at beta_b over the kept pairs; dropped pairs get no gradient.
    The engine reduces per-pair losses, so pair i returns its share, mask_i * (B / k) * -log sigmoid(beta_b *
    m_i), whose mean over the batch is the mean over the kept pairs.

    Worked example (beta = 0.1, alpha = 0.5, rho = 0, momentum = 0.9; l(z) = -log sigmoid(z)):
        batch 1, m = [1, 2, 3]: mean 2, std 1 -> M0 = 0.1 * 2 = 0.2, sigma = 0.1 * 1 = 0.1
            beta_b = 0.1 * (1 + 0.5 * (2 - 0.2)) = 0.19; L = [l(0.19), l(0.38), l(0.57)]
        batch 2, m = [0, 4]: mean 2, std 2.828427 -> M0 = 0.9 * 0.2 + 0.1 * 2 = 0.38,
            sigma = 0.9 * 0.1 + 0.1 * 2.828427 = 0.372843; beta_b = 0.1 * (1 + 0.5 * (2 - 0.38)) = 0.181
        with rho = 0.5 instead, batch 2 keeps one pair: m = 4 is (4 - 0.38) / 0.372843 = 9.7 sigmas out (weight
        e^-47) and m = 0 only 1.0 (weight e^-0.52), so pair 0 is kept; beta_b = 0.1 * (1 + 0.5 * (0 - 0.38))
        = 0.081 and L = [2 * l(0), 0] = [1.386294, 0], mean log 2.

    The batch. The engine calls a loss once per micro-batch, so "the batch" is the ``train.micro_batch_size``
    pairs of one process. The official code gathers each micro-batch's margins across GPUs and filters the
    gathered batch; on one process the two agree.

    Running state. M0, sigma and the number of training batches are updated only by training forwards,
    recognized as ``self.training`` (the engine switches it off to evaluate), gradient mode on and log-probs
    that carry gradient (so a no-grad probe of the margins does not count either). They are saved with
    checkpoints (``state_dict``), so a resumed run continues the same averages and the same filter draws.
    Other forwards, evaluation included, read the state without moving it, keep every pair (the filter picks
    training data; evaluation scores all of it, deterministically) and take beta_b from the mean of all
    margins; the official code also updated the statistics on evaluation batches.

    Corner cases the official code does not guard, handled here: a one-pair batch has no standard deviation,
    so it leaves sigma unchanged (the official code's would become NaN); while sigma is 0 (every margin seen so
    far equal, as at the first step when the policy starts as the reference) the filter keeps a uniform draw
    instead of dividing by zero; at least one pair is always kept. The draws use Gumbel top-k, which gives
    the same distribution as sequential sampling without replacement (the official ``torch.multinomial``) but
    works on log-weights, so weights below float range still order correctly. Every process draws with the
    same seed.

    Hyperparameters: ``beta`` (> 0, default 0.1); ``alpha`` (>= 0, default 0.6); ``rho`` in [0, 1) (default
    0.2); ``momentum`` in [0, 1) (default 0.9); ``seed`` (default 0). alpha = 0 and rho = 0 is DPO exactly.
    Margins are summed log-probs, so alpha's scale (per nat) interacts with response length; the README's
    values are for Pythia-2.8B on Anthropic-HH.

    TRL: none. Rewards are DPO's at the base beta, beta * (p - r), as the official code logs them.
    ``metrics``: ``beta`` (beta_b), ``margin_mean`` and ``margin_std`` (M0 and sigma as this batch used them)
    and ``kept`` (the fraction of the batch kept).
    """

    name = "beta_dpo"
    Config = BetaDPOConfig
    paper = "Wu et al. 2024, beta-DPO: Direct Preference Optimization with Dynamic beta, arXiv:2407.08639"

    def __init__(self, config: BetaDPOConfig) -> None:
        super().__init__(config)
        # Kept as float64 tensors on the batch's device, so updating them never waits for the accelerator.
        self.margin_mean: Tensor = torch.zeros((), dtype=torch.float64)
        self.margin_std: Tensor = torch.zeros((), dtype=torch.float64)
        self.updates = 0

    def __call__(self, logps: PairLogps) -> LossOutput:
        cfg = self.config
        margin = logps.logratio_margin
        gaps = margin.detach().to(torch.float64)
        pairs = gaps.numel()
        training = self.training and torch.is_grad_enabled() and logps.policy_chosen.requires_grad

        if training:
            self._update(gaps)
        mean, std = self.margin_mean.to(gaps.device), self.margin_std.to(gaps.device)
        keep = self._kept_count(pairs) if training else pairs
        if keep < pairs:
            kept = self._filter(gaps, mean, std, keep)
            batch_margin = (gaps * kept).sum() / keep
        else:
            kept = torch.ones_like(gaps)
            batch_margin = gaps.mean()

        beta_batch = (cfg.beta * (1 + cfg.alpha * (batch_margin - mean))).clamp(min=min(BETA_FLOOR, cfg.beta))
        # Each kept pair's share of the mean over kept pairs; the engine's mean over the batch then equals it.
        weight = (kept * (pairs / keep)).to(margin.dtype)
        loss = -F.logsigmoid(beta_batch.to(margin.dtype) * margin) * weight
        chosen_rewards, rejected_rewards = dpo_rewards(cfg.beta, logps)
        metrics = {"beta": beta_batch, "margin_mean": mean, "margin_std": std,
                   "kept": torch.tensor(keep / pairs, dtype=torch.float64, device=gaps.device)}
        return LossOutput(loss, chosen_rewards, rejected_rewards, metrics)

    def _update(self, gaps: Tensor) -> None:
        """Step 1: exponential moving averages of the batch's mean and (unbiased) std of margins."""
        m = self.config.momentum
        self.margin_mean = m * self.margin_mean.to(gaps.device) + (1 - m) * gaps.mean()
        if gaps.numel() > 1:  # one margin has no spread to average in
            self.margin_std = m * self.margin_std.to(gaps.device) + (1 - m) * gaps.std()
        self.updates += 1

    def _kept_count(self, pairs: int) -> int:
        # floor((1 - rho) * B), as the official int(B * (1 - rho)); the 1e-9 keeps a product that lands a hair
        # under an integer in floating point (30 * (1 - 0.9) = 2.9999999999999996) from losing a pair.
        return max(1, math.floor(pairs * (1 - self.config.rho) + 1e-9))

    def _filter(self, gaps: Tensor, mean: Tensor, std: Tensor, keep: int) -> Tensor:
        """Step 2: a 0/1 mask of ``keep`` pairs drawn without replacement with Gaussian weights around the mean.

        Gumbel top-k: the ``keep`` largest of log-weight + Gumbel noise are a draw without replacement with
        probabilities proportional to the weights. The noise comes from a generator seeded with the config's
        seed and the number of training batches so far, so the draw is reproducible and survives a resume.
        """
        spread = std > 0
        z = torch.where(spread, (gaps - mean) / torch.where(spread, std, torch.ones_like(std)), torch.zeros_like(gaps))
        log_weight = -0.5 * z.clamp(-Z_LIMIT, Z_LIMIT).square()
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.updates)
        uniform = torch.rand(gaps.shape, generator=generator, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(torch.float64).tiny)))
        chosen = torch.topk(log_weight + gumbel.to(gaps.device), keep).indices
        return torch.zeros_like(gaps).index_fill_(0, chosen, 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"margin_mean": float(self.margin_mean), "margin_std": float(self.margin_std), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"margin_mean", "margin_std", "updates"}
        if set(state) != expected:
            raise ValueError(f"loss {self.name!r} expects state keys {sorted(expected)}, got {sorted(state)}")
        self.margin_mean = torch.tensor(float(state["margin_mean"]), dtype=torch.float64)
        self.margin_std = torch.tensor(float(state["margin_std"]), dtype=torch.float64)
        self.updates = int(state["updates"])


@hookimpl
def prefopt_register_losses():
    return [BetaDPO]
