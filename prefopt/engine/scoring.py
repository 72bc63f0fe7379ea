"""One batch through the policy and its reference(s), then the loss: what a training or evaluation step scores."""

from __future__ import annotations

from typing import Any

from prefopt.api.loss import PairLogps
from prefopt.engine.run import Run
from prefopt.forward.batching import PreferenceBatch
from prefopt.forward.logprobs import sequence_logps
from prefopt.forward.pairs import pair_logps


def forward_pairs(run: Run, batch: PreferenceBatch, reference, model=None) -> tuple[PairLogps, Any]:
    """The loss of one batch under ``model`` (default: the prepared policy)."""
    policy_logps = sequence_logps(
        run.policy if model is None else model, batch, chunk_size=run.recipe.train.logprob_chunk_size,
        collision=run.loss.requires_token_log_collision, layout=run.recipe.train.layout,
    )
    reference_logps = reference(batch) if reference is not None else None
    logps = pair_logps(policy_logps, reference_logps, run.loss, batch.labels)
    return logps, run.loss(logps)
