"""One batch through the policy and its reference(s), then the loss: what a training or evaluation step scores.

For a loss that declares ``scores_sequences`` the policy is a reward model: it gives one score per sequence
(``sequence_scores``) where a causal LM gives summed log-probs, and there is no reference."""

from __future__ import annotations

from typing import Any

from prefopt.api.loss import PairLogps
from prefopt.engine.run import Run
from prefopt.forward.batching import PreferenceBatch
from prefopt.forward.logprobs import SequenceLogps, sequence_logps, sequence_scores
from prefopt.forward.pairs import pair_logps


def forward_pairs(run: Run, batch: PreferenceBatch, reference, model=None) -> tuple[PairLogps, Any]:
    """The loss of one batch under ``model`` (default: the prepared policy)."""
    _, logps, output = score_pairs(run, batch, reference, model)
    return logps, output


def score_pairs(run: Run, batch: PreferenceBatch, reference, model=None, *, token_stats: bool = False
                ) -> tuple[SequenceLogps, PairLogps, Any]:
    """``forward_pairs``, with the policy's own sequence results first; ``token_stats`` adds its entropy and mean
    logits to them (evaluation's ``entropy`` and ``logits/*``), except for a reward model, which has neither."""
    model = run.policy if model is None else model
    if run.loss.scores_sequences:
        policy_logps = sequence_scores(model, batch)
    else:
        policy_logps = sequence_logps(
            model, batch, chunk_size=run.recipe.train.logprob_chunk_size,
            collision=run.loss.requires_token_log_collision, layout=run.recipe.train.layout, token_stats=token_stats,
        )
    reference_logps = reference(batch) if reference is not None else None
    logps = pair_logps(policy_logps, reference_logps, run.loss, batch.labels)
    return policy_logps, logps, run.loss(logps)
