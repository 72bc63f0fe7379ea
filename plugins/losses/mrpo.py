"""MRPO, multi-reference preference optimization: DPO against a clipped, weighted harmonic mixture of references."""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, hookimpl

# The official code's guard against a zero denominator in the adaptive weights.
_EPS = 1e-6


class MRPOConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Strength of the KL tie to the combined reference, as in dpo.")
    clip: Optional[float] = Field(
        0.1,
        ge=0,
        lt=1,
        description="eta: each extra reference's log-prob is clipped into [(1+eta)*r0, (1-eta)*r0] around the "
        "primary reference's r0, so references stay mutually consistent (official demo: 0.1). null: no clipping.",
    )
    clip_rate: Literal["adaptive", "fixed"] = Field(
        "adaptive",
        description="adaptive: eta is split between chosen and rejected by their share of the mean |log-prob| "
        "(eta*s and eta*(1-s)), as the official code does for eta >= 0; fixed: eta for both (official eta < 0).",
    )
    alpha: Union[Literal["adaptive"], float] = Field(
        "adaptive",
        description="Weight of the primary reference's 1/pi in the combined reference. adaptive (ARWC, the "
        "official alpha < 0): from each reference's chosen-rejected margin, per pair; or a fixed value in [0, 1], "
        "the rest split equally among the extra references.",
    )
    naive: bool = Field(
        False,
        description="The paper's Multi-DPO baseline instead of MRPO: alpha * DPO(clipped extra reference) + "
        "(1 - alpha) * DPO(primary reference). Defined for one extra reference.",
    )
    sft_weight: float = Field(
        0.0, ge=0, description="gamma of an added SFT term: gamma * (-mean log-prob per token of the chosen response)."
    )

    @model_validator(mode="after")
    def _alpha_in_unit_interval(self) -> "MRPOConfig":
        if isinstance(self.alpha, float) and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"loss.alpha must be 'adaptive' or in [0, 1], got {self.alpha}")
        return self


class MRPO(PreferenceLoss):
    """Multi-reference DPO: the reference is a clipped, adaptively weighted mixture of K reference models.

    Le et al. (2024), "Multi-Reference Preference Optimization for Large Language Models", arXiv:2405.16388.
    Written from the official code (thaihungle/MRPO, ``trainer_mref.py``), which covers K = 2.

    References: r0 is the primary reference (the policy's initial weights, or ``reference.path``; the
    official code's r2, the LoRA-disabled policy) and r1..r(K-1) the models in ``reference.extra`` (the
    official r1). Each is a summed log-prob of the chosen (c) or rejected (r) response; all are computed
    once into the reference cache.

    Per pair, for every extra reference k:
    1. weights (ARWC), from the *unclipped* margins m_k = |r_k,c - r_k,r| and S = sum_k m_k:
       w_0 = (S - m_0) / ((K-1)(S + eps)),  w_k = (S - m_k + eps) / ((K-1)(S + eps))  for k >= 1,
       which sum to 1 and are at K = 2 exactly the official alpha = m_1 / (m_0 + m_1 + 1e-6) on 1/pi_r0
       and 1 - alpha on 1/pi_r1. A fixed ``alpha`` is w_0; the extras share 1 - alpha equally.
    2. clipping toward r0: eta_c = eta * s_k, eta_r = eta * (1 - s_k), s_k = |b_c| / (|b_c| + |b_r|),
       b = (r_k + r_0) / 2 (``clip_rate: fixed`` uses eta for both); then r_k <- clamp(r_k, (1+eta) r_0,
       (1-eta) r_0) (log-probs are negative, so (1+eta) r_0 is the lower bound).
    3. the combined reference, a weighted harmonic mixture:  1/pi~ = sum_k w_k / pi_k, i.e.
       log pi~ = -logsumexp_k(log w_k - r_k); at K = 2 this is the official r1 + r2 - log(alpha e^r1 +
       (1-alpha) e^r2).
    4. L = -log sigmoid(beta * ((pc - log pi~_c) - (pr - log pi~_r))) + gamma * SFT, rewards beta (p - log pi~).

    With every reference equal, clipping changes nothing and pi~ = pi: MRPO is DPO. ``naive: true`` is the
    paper's Multi-DPO baseline, alpha * DPO(clipped r1) + (1 - alpha) * DPO(r0), for K = 2. Not in TRL.
    """

    name = "mrpo"
    Config = MRPOConfig
    paper = "Le et al. 2024, Multi-Reference Preference Optimization for Large Language Models, arXiv:2405.16388"
    multi_reference = True

    def __call__(self, logps: PairLogps) -> LossOutput:
        cfg = self.config
        refs_c, refs_r = logps.refs_chosen, logps.refs_rejected  # (K, B)
        k = refs_c.shape[0]
        if k < 2:
            raise ValueError("mrpo needs at least one reference in reference.extra")
        weights = self.weights(refs_c, refs_r)  # (K, B)
        clipped_c, clipped_r = self.clipped(refs_c, refs_r)
        if cfg.naive:
            if k != 2:
                raise ValueError("mrpo naive (Multi-DPO) is defined for one extra reference; list one in reference.extra")
            alpha = weights[0]
            loss = alpha * self._dpo(logps, clipped_c[1], clipped_r[1]) + (1 - alpha) * self._dpo(
                logps, refs_c[0], refs_r[0])
            combined_c, combined_r = refs_c[0], refs_r[0]  # the official code logs the primary's rewards
        else:
            combined_c, combined_r = combine(clipped_c, weights), combine(clipped_r, weights)
            loss = self._dpo(logps, combined_c, combined_r)
        if cfg.sft_weight > 0:
            loss = loss + cfg.sft_weight * -logps.policy_chosen_mean
        with torch.no_grad():
            chosen_rewards = cfg.beta * (logps.policy_chosen - combined_c)
            rejected_rewards = cfg.beta * (logps.policy_rejected - combined_r)
        metrics = {"primary_weight": weights[0].detach(),
                   "combined_margin": (combined_c - combined_r).detach()}
        return LossOutput(loss, chosen_rewards, rejected_rewards, metrics=metrics)

    def _dpo(self, logps: PairLogps, ref_c: Tensor, ref_r: Tensor) -> Tensor:
        margin = (logps.policy_chosen - ref_c) - (logps.policy_rejected - ref_r)
        return -F.logsigmoid(self.config.beta * margin)

    def weights(self, refs_c: Tensor, refs_r: Tensor) -> Tensor:
        """w_k per pair, (K, B), summing to 1 over k (the weight of 1/pi_k in the combined reference)."""
        k = refs_c.shape[0]
        if self.config.alpha != "adaptive":
            primary = torch.full_like(refs_c[0], float(self.config.alpha))
            extras = ((1 - primary) / (k - 1)).expand(k - 1, -1)
            return torch.cat([primary.unsqueeze(0), extras])
        margins = (refs_c - refs_r).abs()  # m_k, before clipping (as the official code)
        total = margins.sum(0)
        eps = torch.zeros_like(margins)
        eps[1:] = _EPS
        return (total - margins + eps) / ((k - 1) * (total + _EPS))

    def clipped(self, refs_c: Tensor, refs_r: Tensor) -> tuple[Tensor, Tensor]:
        """Each extra reference clamped into [(1+eta) r0, (1-eta) r0], chosen and rejected; r0 unchanged."""
        eta = self.config.clip
        if eta is None:
            return refs_c, refs_r
        r0_c, r0_r = refs_c[0], refs_r[0]
        out_c, out_r = [r0_c], [r0_r]
        for rk_c, rk_r in zip(refs_c[1:], refs_r[1:]):
            if self.config.clip_rate == "adaptive":
                b_c, b_r = ((rk_c + r0_c) / 2).abs(), ((rk_r + r0_r) / 2).abs()
                share = b_c / (b_c + b_r)
                eta_c, eta_r = eta * share, eta * (1 - share)
            else:
                eta_c = eta_r = eta
            out_c.append(torch.minimum(torch.maximum(rk_c, r0_c * (1 + eta_c)), r0_c * (1 - eta_c)))
            out_r.append(torch.minimum(torch.maximum(rk_r, r0_r * (1 + eta_r)), r0_r * (1 - eta_r)))
        return torch.stack(out_c), torch.stack(out_r)


def combine(refs: Tensor, weights: Tensor) -> Tensor:
    """log pi~ with 1/pi~ = sum_k w_k / pi_k, stably: -logsumexp_k(log w_k - log pi_k). A zero weight drops out."""
    return -torch.logsumexp(torch.log(weights) - refs, dim=0)


@hookimpl
def prefopt_register_losses():
    return [MRPO]
