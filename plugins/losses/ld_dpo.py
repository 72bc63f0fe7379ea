"""LD-DPO, length-desensitized DPO: tokens past the shorter response's length count only alpha-fold."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from prefopt import LossConfig, LossOutput, PairLogps, PreferenceLoss, hookimpl


class LDDPOConfig(LossConfig):
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the KL tie to the reference, as in DPO (typical 0.01-0.5); 0.1 is TRL's default.",
    )
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight of the log-probs of tokens beyond the shorter response's length, in [0, 1]: 1 is "
        "DPO, 0 compares only the common-length prefixes. Model-dependent; 0.5 is the paper's best for "
        "Llama3-8B-Instruct and TRL's suggested start (TRL's `ld_alpha` defaults to None, off).",
    )


def desensitized_logps(token_logps: Tensor, mask: Tensor, shared: Tensor, alpha: float) -> Tensor:
    """sum over the first ``shared`` response tokens + alpha * sum over the rest, per row.

    ``mask`` marks response positions (B, T); a token's place within its response is the running count of
    the mask, so prompts and padding of any length are skipped."""
    place = mask.cumsum(dim=-1)
    head = mask & (place <= shared.unsqueeze(-1))
    tail = mask & ~head
    zero = token_logps.new_zeros(())
    return torch.where(head, token_logps, zero).sum(-1) + alpha * torch.where(tail, token_logps, zero).sum(-1)


class LDDPO(PreferenceLoss):
    """Length-desensitized DPO: DPO on log-probs whose tokens beyond the shared length are weighted alpha.

    Wei Liu et al. (2024), "Length Desensitization in Direct Preference Optimization", arXiv:2409.06411.

    Loss, per pair:  L = -log sigmoid(beta * ((pc~ - rc~) - (pr~ - rr~))), where for each of the four
    sequence log-probs
        p~ = sum_{t <= l} log p_t + alpha * sum_{t > l} log p_t,   l = min(Lc, Lr)
    is split at the length l the two responses share. DPO's summed log-probs make the longer response's
    log-ratio larger in magnitude simply because it has more tokens, which the paper shows pushes DPO
    toward verbose outputs. Down-weighting the excess tokens by alpha (as if their likelihood were raised
    to the power alpha) removes that length-driven part of the gradient. alpha = 1 is DPO exactly.

    Hyperparameters: ``beta`` (> 0, default 0.1 as TRL); ``alpha`` in [0, 1] (default 0.5, the paper's best
    for Llama3-8B-Instruct and the starting point TRL's docs suggest).

    Needs per-token log-probs of policy and reference (``requires_token_logps``). Equals TRL >= 0.29's
    ``DPOTrainer(loss_type="sigmoid", ld_alpha=alpha)``, which weights the reference's tokens too. TRL 0.19-
    0.28 weighted only the policy's, and counted token places from the start of the sequence rather than
    of the response, so with a prompt at least as long as the response no token was counted; those
    versions are not a parity target. Whether the paper weights the reference's tokens was not confirmed.
    Rewards are beta * (p~ - r~), the weighted log-ratios, as TRL logs them.

    Watch the stopping rate when chosen responses are mostly the longer ones. Each response ends with EOS,
    and the longer response's EOS lies in the alpha-weighted tail. The chosen EOS is then raised at alpha
    weight and the rejected EOS lowered at full weight, which pushes against stopping. On length-biased
    labels where the chosen was longer in 78% of pairs, LD-DPO (alpha 0.5) lowered log p(EOS) by 13-17
    nats and ran every sample to the token limit; DPO moved it by at most 2.5 (benchmarks/README.md,
    claim 3).
    """

    name = "ld_dpo"
    Config = LDDPOConfig
    paper = "Liu et al. 2024, Length Desensitization in Direct Preference Optimization, arXiv:2409.06411"
    requires_token_logps = True

    def __call__(self, logps: PairLogps) -> LossOutput:
        alpha, beta = self.config.alpha, self.config.beta
        shared = torch.minimum(logps.chosen_mask.sum(-1), logps.rejected_mask.sum(-1))
        chosen = desensitized_logps(logps.policy_chosen_token_logps, logps.chosen_mask, shared, alpha)
        chosen = chosen - desensitized_logps(logps.ref_chosen_token_logps, logps.chosen_mask, shared, alpha)
        rejected = desensitized_logps(logps.policy_rejected_token_logps, logps.rejected_mask, shared, alpha)
        rejected = rejected - desensitized_logps(logps.ref_rejected_token_logps, logps.rejected_mask, shared, alpha)
        loss = -F.logsigmoid(beta * (chosen - rejected))
        return LossOutput(loss, beta * chosen.detach(), beta * rejected.detach())


@hookimpl
def prefopt_register_losses():
    return [LDDPO]
