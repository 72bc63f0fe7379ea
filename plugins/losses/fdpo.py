"""f-DPO: DPO's sigmoid loss with the reverse-KL regularizer replaced by another f-divergence."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards, hookimpl

# exp() of a larger exponent would not fit in float32 once multiplied by beta; TRL clamps alpha-divergence's
# exponent at the same value.
MAX_EXPONENT = 80.0


class FDPOConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the divergence tie to the reference, as in DPO (typical 0.01-0.5); 0.1 is "
        "TRL's default.",
    )
    divergence: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = Field(
        "reverse_kl",
        description="The f-divergence to the reference: reverse_kl (DPO), forward_kl, js_divergence (Jensen-"
        "Shannon) or alpha_divergence. Names and default as TRL's `f_divergence_type`.",
    )
    alpha: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="alpha of the alpha-divergence, in the paper's convention, in (0, 1): toward 0 it becomes "
        "reverse KL, toward 1 forward KL. Used only with divergence=alpha_divergence. TRL >= 0.29's "
        "`f_alpha_divergence_coef` is 1 - alpha (both default to 0.5, where they agree).",
    )


def f_prime(log_ratio: Tensor, divergence: str, alpha: float) -> Tensor:
    """f'(u) at u = exp(log_ratio), the divergence's reward, without additive constants (they cancel in
    the chosen-minus-rejected margin): log u, -1/u, log(u / (1 + u)), -u^(-alpha) / alpha."""
    if divergence == "reverse_kl":
        return log_ratio
    if divergence == "forward_kl":
        return -torch.exp(torch.clamp(-log_ratio, max=MAX_EXPONENT))
    if divergence == "js_divergence":
        return F.logsigmoid(log_ratio)
    if divergence == "alpha_divergence":
        return -torch.exp(torch.clamp(-alpha * log_ratio, max=MAX_EXPONENT)) / alpha
    raise ValueError(f"unknown divergence {divergence!r}")


class FDPO(PreferenceLoss):
    """f-DPO: -log sigmoid(beta * (f'(u_c) - f'(u_r))), DPO under a chosen f-divergence (u = pi/pi_ref).

    Wang, Jiang, Yang, Liu, Chen (2024), "Beyond Reverse KL: Generalizing Direct Preference Optimization
    with Diverse Divergence Constraints", ICLR 2024, arXiv:2309.16240.

    Loss, per pair:  L = -log sigmoid(beta * (f'(uc) - f'(ur))),  uc = exp(pc - rc),  ur = exp(pr - rr)
    where f is the generator of the divergence that ties the policy to the reference in the RLHF
    objective. DPO's reverse KL (f(u) = u log u) gives f'(u) = log u + 1, recovering DPO; the paper shows
    that for any f whose f' is invertible the same closed-form reward, beta * f'(pi/pi_ref), holds. With
    constants dropped (they cancel in the margin):
        reverse_kl  f'(u) = log u                  (DPO: mode-seeking, least diverse)
        forward_kl  f'(u) = -1/u                   (mass-covering: keeps more diversity)
        js_divergence  f'(u) = log(u / (1 + u))
        alpha_divergence  f'(u) = -u^(-alpha)/alpha  (alpha -> 0: reverse KL; alpha -> 1: forward KL)
    The paper reports that the choice trades alignment reward against generation diversity, forward KL
    lying at the diverse end.

    Hyperparameters: ``beta`` (> 0, default 0.1 as TRL); ``divergence`` (default reverse_kl, TRL's); ``alpha``
    in (0, 1) (default 0.5; the paper sweeps alpha, e.g. 0.3, 0.5, 0.7 per TRL's docs).

    Equals TRL's ``DPOTrainer(loss_type="sigmoid", f_divergence_type=...)`` with
    ``f_alpha_divergence_coef = 1 - alpha``. Differences: ``alpha`` follows the paper's convention (TRL <=
    0.28 did too, with default 1.0, which is forward KL; TRL >= 0.29 uses a = 1 - alpha); the exponent of
    forward KL is clamped at 80 as TRL clamps alpha-divergence's (TRL overflows to inf and NaN there), so
    beyond a log-ratio of -80 that response's score stops changing; f' drops the additive constants TRL
    keeps, which cancel in this loss. Only this (sigmoid) form: TRL also applies the transform inside its
    hinge, IPO, EXO, robust, DiscoPOP and length-normalized losses. Rewards are DPO's, beta * (p - r), not
    transformed, as TRL logs them.
    """

    name = "fdpo"
    Config = FDPOConfig
    paper = (
        "Wang et al. 2024, Beyond Reverse KL: Generalizing DPO with Diverse Divergence Constraints, "
        "arXiv:2309.16240"
    )

    def __call__(self, logps: PairLogps) -> LossOutput:
        c = self.config
        chosen = f_prime(logps.chosen_logratios, c.divergence, c.alpha)
        rejected = f_prime(logps.rejected_logratios, c.divergence, c.alpha)
        loss = -F.logsigmoid(c.beta * (chosen - rejected))
        chosen_rewards, rejected_rewards = dpo_rewards(c.beta, logps)
        return LossOutput(loss, chosen_rewards, rejected_rewards)


@hookimpl
def prefopt_register_losses():
    return [FDPO]
