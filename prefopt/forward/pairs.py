"""``PairLogps`` assembled from the policy's and the references' sequence log-probs."""

from __future__ import annotations

from typing import Any

import torch

from prefopt.api.loss import PairLogps, PreferenceLoss
from prefopt.forward.logprobs import SequenceLogps


def pair_logps(policy: SequenceLogps, references: list[SequenceLogps] | None, loss: PreferenceLoss,
               labels: torch.Tensor | None = None) -> PairLogps:
    """Assemble what the loss declared it needs from the policy's and the references' results (primary
    reference first); ``labels`` (the batch's, for unpaired examples) are passed through."""
    chosen, rejected = policy.split()
    fields: dict[str, Any] = dict(
        policy_chosen=chosen.sums, policy_rejected=rejected.sums,
        chosen_tokens=chosen.token_counts, rejected_tokens=rejected.token_counts, labels=labels,
    )
    token_level = loss.requires_token_logps or loss.requires_token_log_collision
    if token_level:
        fields.update(
            policy_chosen_token_logps=chosen.token_logps, policy_rejected_token_logps=rejected.token_logps,
            chosen_mask=chosen.mask, rejected_mask=rejected.mask,
        )
    if loss.requires_token_log_collision:
        fields.update(
            policy_chosen_token_log_collision=chosen.token_log_collision,
            policy_rejected_token_log_collision=rejected.token_log_collision,
        )
    if references:
        ref_chosen, ref_rejected = references[0].split()
        fields.update(ref_chosen=ref_chosen.sums, ref_rejected=ref_rejected.sums)
        if token_level:
            fields.update(ref_chosen_token_logps=ref_chosen.token_logps,
                          ref_rejected_token_logps=ref_rejected.token_logps)
        if loss.multi_reference:
            halves = [r.split() for r in references]
            fields.update(refs_chosen=torch.stack([c.sums for c, _ in halves]),
                          refs_rejected=torch.stack([r.sums for _, r in halves]))
    return PairLogps(**fields)
