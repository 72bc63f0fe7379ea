"""The only place log-probs are computed and reduced.

The policy's forward stops at the last hidden states (the model is asked for no logits); the output
head is then applied to response positions only, a chunk of ``chunk_size`` tokens at a time, each
chunk's float32 log-softmax recomputed in backward rather than stored. Peak memory for the head is
therefore ``chunk_size x vocab`` floats, not ``batch x sequence x vocab``, and prompt and padding
positions are never scored.

Models whose head does more than a linear map (logit soft-capping or scaling in their config),
models whose forward has no ``logits_to_keep`` and models whose weights are sharded (FSDP, DeepSpeed
ZeRO-3: outside the forward the head holds only this process's shard) take the plain path: full
logits, log-softmax in chunks of rows. Both paths give the same numbers (tests/test_logprobs.py).

A reward model's forward (``sequence_scores``, for a loss that declares ``scores_sequences``) returns the same
shape with one scalar score per sequence in place of the summed log-probs.

Both paths run the batch in any layout of ``prefopt.forward.layouts`` (padded, packed, prefix-shared) and read
the predictions back in the padded layout's order, so results have the same shape whatever the layout.

On request (``token_stats``) each chunk also gives, from the float32 logits it holds anyway, the entropy of
every response position's next-token distribution and its logits' mean over the vocabulary (TRL's ``entropy``
and ``logits/*``), summed per sequence and detached. Under gradient checkpointing they are taken in the
forward only, not again when backward recomputes the chunk.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from prefopt.forward.batching import PreferenceBatch
from prefopt.forward.layouts import LayoutInputs, layout_inputs

# Config attributes that make the head more than a linear map; such models take the plain path.
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass
class SequenceLogps:
    """Per-sequence results for the 2B rows of a batch (chosen rows first). For a sequence scorer (a reward
    model, ``sequence_scores``) ``sums`` are its scores and ``token_logps`` is None."""

    sums: Tensor  # (2B,) summed response log-probs; a scorer's scores
    token_counts: Tensor  # (2B,) float number of response tokens
    token_logps: Tensor | None  # (2B, T-1) log-prob of token t+1 at position t; 0 outside the response
    mask: Tensor  # (2B, T-1) bool: response targets
    # (2B, T-1) log sum_v p_v^2 of each next-token distribution (WPO's weights), detached; only on request
    token_log_collision: Tensor | None = None
    # (2B,) summed over the response positions: the entropy of the next-token distribution, and the mean of
    # the logits over the vocabulary; detached, float32, only on request (``token_stats``)
    entropy_sums: Tensor | None = None
    mean_logit_sums: Tensor | None = None

    def split(self) -> tuple["SequenceLogps", "SequenceLogps"]:
        """(chosen, rejected) halves."""
        half = self.sums.shape[0] // 2

        def pick(rows: slice) -> SequenceLogps:
            cut = lambda t: None if t is None else t[rows]  # noqa: E731
            return SequenceLogps(
                self.sums[rows], self.token_counts[rows], cut(self.token_logps), self.mask[rows],
                cut(self.token_log_collision), cut(self.entropy_sums), cut(self.mean_logit_sums),
            )

        return pick(slice(0, half)), pick(slice(half, None))


def _inner_model(model: nn.Module) -> nn.Module:
    """The transformers model under a DDP wrapper (PEFT wrappers forward attributes themselves)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s weights are sharded over processes: FSDP (1 or 2) or DeepSpeed ZeRO-3."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()):
        return True
    return any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3 partitions each parameter


def supports_head_path(model: nn.Module) -> bool:
    """Whether the chunked head path is exact for this model."""
    if is_sharded(model):
        return False
    inner = _inner_model(model)
    config = getattr(inner, "config", None)
    if config is None or not hasattr(inner, "get_decoder") or inner.get_output_embeddings() is None:
        return False
    for attr in _HEAD_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 0, 1, 1.0):
            return False
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _selected_logps(logits: Tensor, targets: Tensor, collision: bool, stats: list | None = None
                    ) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each target under float32 ``logits`` (N, V), and optionally log sum_v p_v^2 (detached).
    ``stats``, an empty list, receives the positions' ``_token_stats``."""
    normalizer = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normalizer
    # an empty list only: backward's recomputation of a checkpointed chunk finds it filled and skips the work
    if stats is not None and not stats:
        stats.append(_token_stats(logits.detach(), normalizer.detach()))
    if not collision:
        return logps, None
    with torch.no_grad():  # a weight, never a path for gradients
        log_collision = torch.logsumexp(2 * logits, dim=-1) - 2 * normalizer
    return logps, log_collision


@torch.no_grad()
def _token_stats(logits: Tensor, normalizer: Tensor) -> Tensor:
    """(..., 2): each position's entropy, -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v (TRL's form), and
    its logits' mean over the vocabulary."""
    weighted = (torch.exp(logits - normalizer.unsqueeze(-1)) * logits).sum(-1)
    return torch.stack([normalizer - weighted, logits.mean(-1)], dim=-1)


def _chunk_logps(head: nn.Module, hidden: Tensor, targets: Tensor, collision: bool, stats: list | None = None
                 ) -> tuple[Tensor, Tensor | None]:
    return _selected_logps(head(hidden).float(), targets, collision, stats)


def _head_path(
    model: nn.Module, batch: PreferenceBatch, inputs: LayoutInputs, targets_mask: Tensor, chunk_size: int,
    collision: bool, stats: list | None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the response targets (flat, row-major over ``targets_mask``), and optionally their
    distributions' log collision probabilities; ``stats`` collects each chunk's ``_token_stats``."""
    inner = _inner_model(model)
    captured: list[Tensor] = []
    hook = inner.get_decoder().register_forward_hook(
        lambda _module, _args, output: captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)
    )
    try:
        # Through the (possibly DDP-wrapped) model, so distributed hooks run; it computes no logits.
        # use_cache=False also matters for packing: transformers detects packed sequences only without a cache.
        model(
            **inputs.model_kwargs(),
            logits_to_keep=torch.empty(0, dtype=torch.long, device=batch.input_ids.device),
            use_cache=False,
        )
    finally:
        hook.remove()
    hidden = inputs.select(captured[-1], targets_mask)  # (N, H): only positions that predict a response token
    targets = batch.input_ids[:, 1:][targets_mask]
    head = inner.get_output_embeddings()
    pieces = []
    for start in range(0, targets.numel(), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        chunk_stats = _chunk_sink(stats)
        if torch.is_grad_enabled():
            # Recompute this chunk's logits in backward instead of keeping (chunk x vocab) floats alive.
            pieces.append(checkpoint(_chunk_logps, head, h, t, collision, chunk_stats, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, h, t, collision, chunk_stats))
    return _concat(pieces, hidden, collision)


def _chunk_sink(stats: list | None) -> list | None:
    """A fresh list for one chunk's ``_token_stats``, kept in ``stats`` (None: none asked for)."""
    if stats is None:
        return None
    sink: list = []
    stats.append(sink)
    return sink


def _concat(pieces: list, like: Tensor, collision: bool) -> tuple[Tensor, Tensor | None]:
    if not pieces:
        empty = like.new_zeros(0, dtype=torch.float32)
        return empty, (empty if collision else None)
    logps = torch.cat([p[0] for p in pieces])
    return logps, (torch.cat([p[1] for p in pieces]) if collision else None)


def _logits_path(
    model: nn.Module, batch: PreferenceBatch, inputs: LayoutInputs, targets_mask: Tensor, chunk_size: int,
    collision: bool, stats: list | None,
) -> tuple[Tensor, Tensor | None]:
    logits = model(**inputs.model_kwargs(), use_cache=False).logits
    if inputs.source is not None:
        return _gathered_logits_logps(logits, inputs, batch, targets_mask, chunk_size, collision, stats)
    logits = logits[:, :-1]
    targets = batch.input_ids[:, 1:]
    rows_per_chunk = max(1, chunk_size // max(1, logits.shape[1]))
    pieces = []
    for start in range(0, logits.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        chunk_stats = _chunk_sink(stats)
        logp, log_collision = _selected_logps(logits[rows].float(), targets[rows], collision, chunk_stats)
        keep = targets_mask[rows]
        if chunk_stats:
            chunk_stats[0] = chunk_stats[0][keep]
        pieces.append((logp[keep], None if log_collision is None else log_collision[keep]))
    return _concat(pieces, logits, collision)


def _gathered_logits_logps(
    logits: Tensor, inputs: LayoutInputs, batch: PreferenceBatch, targets_mask: Tensor, chunk_size: int,
    collision: bool, stats: list | None,
) -> tuple[Tensor, Tensor | None]:
    """The logits path for a non-padded layout: the predicting positions are gathered from the flat
    (R * L, V) logits ``chunk_size`` at a time, so only a chunk is ever in float32."""
    flat_logits = logits.flatten(0, 1)
    sources = inputs.source[targets_mask]
    targets = batch.input_ids[:, 1:][targets_mask]
    pieces = []
    for start in range(0, targets.numel(), chunk_size):
        rows = sources[start : start + chunk_size]
        pieces.append(_selected_logps(flat_logits[rows].float(), targets[start : start + chunk_size], collision,
                                      _chunk_sink(stats)))
    return _concat(pieces, logits, collision)


def sequence_logps(
    model: nn.Module,
    batch: PreferenceBatch,
    *,
    chunk_size: int = 1024,
    use_head_path: bool | None = None,
    collision: bool = False,
    layout: str = "padded",
    token_stats: bool = False,
) -> SequenceLogps:
    """Summed and per-token response log-probs of every row of ``batch`` under ``model``.

    ``collision`` also returns each response position's log sum_v p_v^2 (for WPO); it costs one more
    log-sum-exp over the vocabulary per token. ``token_stats`` also returns each row's summed entropy and mean
    logit (``entropy_sums``, ``mean_logit_sums``); two more passes over each chunk's logits. ``layout`` is how
    the batch goes through the model (``prefopt.forward.layouts``); the results are the same for every layout,
    up to float summation order.
    """
    targets_mask = batch.response_mask[:, 1:]
    if use_head_path is None:
        use_head_path = supports_head_path(model)
    inputs = layout_inputs(_inner_model(model), batch, layout)
    path = _head_path if use_head_path else _logits_path
    stats: list | None = [] if token_stats else None
    flat, flat_collision = path(model, batch, inputs, targets_mask, chunk_size, collision, stats)
    token_logps = torch.zeros(targets_mask.shape, dtype=flat.dtype, device=flat.device)
    token_logps = token_logps.masked_scatter(targets_mask, flat)
    token_log_collision = None
    if flat_collision is not None:
        token_log_collision = torch.zeros_like(token_logps).masked_scatter(targets_mask, flat_collision)
    entropy_sums = mean_logit_sums = None
    if stats is not None:
        entropy_sums, mean_logit_sums = _per_sequence(stats, targets_mask, flat)
    return SequenceLogps(
        sums=token_logps.sum(-1),
        token_counts=targets_mask.sum(-1).to(token_logps.dtype),
        token_logps=token_logps,
        mask=targets_mask,
        token_log_collision=token_log_collision,
        entropy_sums=entropy_sums,
        mean_logit_sums=mean_logit_sums,
    )


def _per_sequence(stats: list[list[Tensor]], targets_mask: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """The chunks' flat (N, 2) token stats summed per row of the batch: (entropy sums, mean-logit sums)."""
    flat = torch.cat([sink[0] for sink in stats]) if stats else like.new_zeros(0, 2, dtype=torch.float32)
    per_token = flat.new_zeros(*targets_mask.shape, 2)
    per_token[targets_mask] = flat
    sums = per_token.sum(1)
    return sums[:, 0], sums[:, 1]


def sequence_scores(model: nn.Module, batch: PreferenceBatch) -> SequenceLogps:
    """One scalar score per row of ``batch`` under a sequence scorer (``AutoModelForSequenceClassification``
    with one output, ``config.pad_token_id`` set to the batch's pad id), in ``sums``; token counts as usual.

    The batch goes through the model's own forward in the padded layout, so the score is read where
    transformers reads it, and where the ``reward_model`` judge reads it when it scores the saved model: at
    each row's last token that is not the pad id. Right-padded rows of prompt + response end at their last
    response token, so that is where it is read, unless the response itself ends in the pad token (an EOS that
    is also the pad), which the judge skips too.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    targets_mask = batch.response_mask[:, 1:]
    return SequenceLogps(
        sums=logits[:, 0].float(),  # float32 under autocast too, as log-probs are
        token_counts=targets_mask.sum(-1).float(),
        token_logps=None,
        mask=targets_mask,
    )
