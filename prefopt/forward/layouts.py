"""Batch layouts: how the 2B sequences of a ``PreferenceBatch`` are laid out for the model's forward.

- ``padded``: the batch as collated, one right-padded row per sequence (chosen rows, then rejected).
- ``packed``: all 2B sequences concatenated into one row, no padding; position ids restart at 0 for
  every sequence and attention is confined to each sequence.
- ``prefix_shared``: one row per pair, ``prompt + chosen + rejected``. The prompt is run once; chosen
  tokens see the prompt and earlier chosen tokens, rejected tokens see the prompt and earlier rejected
  tokens but no chosen ones, and rejected positions restart after the prompt (rejected token j sits at
  position len(prompt) + j, as in the padded layout).

Each layout is exact: every response token is predicted from the same context at the same positions
as in the padded layout, so its log-prob equals the padded one up to float summation order. This
module only turns a batch into model inputs and says where each prediction lands in the model's
outputs (``LayoutInputs.source``); ``prefopt.forward.logprobs`` gathers them back into the padded layout's
order, so every consumer (losses, reference cache, metrics) sees the same ``SequenceLogps``.

How attention is confined, for the attention implementations of transformers 5:

- sdpa and eager take a custom 4D mask passed as ``attention_mask`` (transformers' mask factories
  return a 4D mask unchanged): a boolean mask for sdpa, an additive one for eager. This is exact but
  not sparse: one packed row costs attention over all its tokens at once.
- flash attention and flex attention get no mask but restarting ``position_ids``, from which
  transformers derives varlen boundaries (flash) or a block mask (flex): the fast path on GPUs. sdpa and
  eager take it too where sliding-window layers need their own masks; on CPU transformers then builds
  the same dense block-diagonal mask itself.

Where a model cannot confine attention as a layout needs (a prefix-shared mask under flash attention,
ALiBi, sliding windows shorter than the batch, models that build their own masks), ``layout_inputs``
logs once and uses ``padded``.

``auto``, the default, is ``prefix_shared`` wherever the model takes it and ``padded`` elsewhere, decided per
batch and silently. Measured on CPU (benchmarks/results/layouts.json, mfu_*.json), prefix sharing was the
fastest exact layout at every prompt:response ratio tried, from 384:64 (1.70x padded) to 64:256 (1.16x), and
needs less memory: it runs the prompt once and pads one row per pair instead of two. Packing was slower than
padding on CPU, where its attention mask is dense, so ``auto`` never packs.
"""

from __future__ import annotations

import inspect
import logging
import sys
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from prefopt.forward.batching import PreferenceBatch
from prefopt.data.types import TokenizedPair

log = logging.getLogger(__name__)

Layout = Literal["auto", "padded", "packed", "prefix_shared"]
LAYOUTS: tuple[str, ...] = ("auto", "padded", "packed", "prefix_shared")

# Attention implementations that honour a custom 4D mask, and the mask dtype each wants.
_MASK_KINDS = {"sdpa": "bool", "eager": "additive"}
# Implementations that confine attention to each packed sequence from restarting position ids alone.
_POSITION_ID_PACKING = ("flash_attention_2", "flash_attention_3", "flex_attention")
# transformers' mask factories; a decoder built on them returns a 4D mask unchanged.
_MASK_FACTORIES = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")

_reported: set[tuple[str, str, str]] = set()  # (model class, layout, reason) already logged


@dataclass
class LayoutInputs:
    """Model inputs for one layout, and where each padded-layout prediction lands in its outputs."""

    layout: str
    input_ids: Tensor  # (R, L)
    attention_mask: Tensor | None  # (R, L) padding mask, (R, 1, L, L) custom mask, or None (position ids)
    position_ids: Tensor | None  # (R, L), or None for the model's default 0..L-1
    # (2B, T-1) long: for padded row r and position t (the prediction of token t + 1 of the collated
    # batch), the index into the layout's outputs flattened to (R * L); only meaningful where the batch's
    # targets mask is true. None for the padded layout, whose outputs are already in that order.
    source: Tensor | None

    def model_kwargs(self) -> dict[str, Tensor]:
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.position_ids is not None:
            kwargs["position_ids"] = self.position_ids
        return kwargs

    def select(self, outputs: Tensor, targets_mask: Tensor) -> Tensor:
        """Rows of ``outputs`` (R, L, ...) that predict the response targets, in the padded layout's
        row-major order over ``targets_mask`` (2B, T-1): (N, ...)."""
        if self.source is None:
            return outputs[:, :-1][targets_mask]
        return outputs.flatten(0, 1)[self.source[targets_mask]]


def row_length(pair: TokenizedPair, layout: str) -> int:
    """Tokens in the longest row ``pair`` puts in a batch of this layout (what length grouping sorts by)."""
    prompt, chosen, rejected = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    if layout in ("prefix_shared", "auto"):  # auto shares the prompt wherever the model allows
        return prompt + chosen + rejected
    return prompt + max(chosen, rejected)


def layout_inputs(model: nn.Module, batch: PreferenceBatch, layout: str = "padded") -> LayoutInputs:
    """``batch`` laid out for ``model`` (a transformers model, possibly PEFT-wrapped, not DDP-wrapped);
    the padded layout where the model cannot confine attention as ``layout`` needs (logged once)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = resolve_auto(model, batch.input_ids.shape[1])[0]
    if layout == "padded":
        return padded_inputs(batch)
    reason = unsupported_reason(model, layout, batch.input_ids.shape[1])
    if reason is not None:
        _report_fallback(model, layout, reason)
        return padded_inputs(batch)
    confine = _confinement(model, batch.input_ids.shape[1])
    if layout == "packed":
        return packed_inputs(batch, mask_kind=None if confine == "position_ids" else confine, dtype=_dtype(model))
    return prefix_shared_inputs(batch, mask_kind=confine, dtype=_dtype(model))


# ----------------------------------------------------------------------------------------------------------
# which models can take which layout


def resolve_auto(model: nn.Module, width: int) -> tuple[str, str | None]:
    """The layout ``auto`` runs for ``model`` on batches ``width`` tokens wide, and why not prefix sharing (None
    when it is prefix sharing)."""
    reason = unsupported_reason(model, "prefix_shared", width)
    return ("prefix_shared", None) if reason is None else ("padded", reason)


def describe_layout(model: nn.Module, layout: str, width: int) -> str:
    """What ``layout`` runs as for ``model`` on batches up to ``width`` tokens wide, for the run's first lines."""
    if layout != "auto":
        reason = unsupported_reason(model, layout, width)
        return layout if reason is None else f"padded (train.layout={layout}, but {type(model).__name__} {reason})"
    chosen, reason = resolve_auto(model, width)
    if reason is None:
        return "prefix_shared (auto: the prompt runs once per pair)"
    return f"padded (auto: {type(model).__name__} {reason})"


def unsupported_reason(model: nn.Module, layout: str, width: int) -> str | None:
    """Why ``model`` cannot run ``layout`` exactly on batches ``width`` tokens wide, or None if it can."""
    if layout == "padded":
        return None
    config = getattr(model, "config", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if config is None or decoder is None:
        return "it is not a transformers decoder model"
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        return "its forward takes no position ids (e.g. ALiBi models), so positions cannot restart"
    if getattr(config.get_text_config(), "alibi", False):
        return "it uses ALiBi, whose biases follow token indices rather than position ids"
    if not _uses_mask_factories(decoder):
        return "it builds its own attention masks, which may not honour a custom mask or restarting positions"
    implementation = config._attn_implementation or "eager"
    if layout == "packed":
        if implementation in _MASK_KINDS or implementation in _POSITION_ID_PACKING:
            return None
        return f"attention implementation {implementation!r} cannot confine attention to each packed sequence"
    if implementation not in _MASK_KINDS:
        return (f"attention implementation {implementation!r} takes no custom attention mask "
                f"(prefix sharing needs sdpa or eager)")
    # A custom mask replaces the window; that is exact only while no sequence is longer than the window.
    window = _binding_window(config, width)
    if window is not None:
        return (f"its sliding-window or chunked attention ({window} tokens) is shorter than the batch, "
                "and a custom mask would replace the window")
    return None


def _uses_mask_factories(decoder: nn.Module) -> bool:
    """Whether the decoder's module builds its masks with transformers' mask factories."""
    from transformers import masking_utils

    module = sys.modules.get(type(decoder).__module__)
    return any(getattr(module, name, None) is getattr(masking_utils, name, False) for name in _MASK_FACTORIES)


def _binding_window(config, width: int) -> int | None:
    """The sliding-window (or attention-chunk) size when some layer has one that a ``width``-token
    sequence exceeds; None when every layer sees the whole sequence anyway."""
    text = config.get_text_config()
    layer_types = getattr(text, "layer_types", None)
    windows = []
    if layer_types is not None and any(kind != "full_attention" for kind in layer_types):
        windows.append(getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None) or 0)
    elif layer_types is None and getattr(text, "sliding_window", None) is not None:
        windows.append(text.sliding_window)
    if getattr(text, "attention_chunk_size", None) is not None:
        windows.append(text.attention_chunk_size)
    binding = [w for w in windows if w < width]
    return min(binding) if binding else None


def _confinement(model: nn.Module, width: int) -> str:
    """How this model's attention is confined: a custom 4D mask ("bool" or "additive"), or restarting
    position ids (flash and flex attention, and sdpa/eager models whose sliding windows need the
    per-layer masks transformers builds from them)."""
    implementation = model.config._attn_implementation or "eager"
    if implementation in _MASK_KINDS and _binding_window(model.config, width) is None:
        return _MASK_KINDS[implementation]
    return "position_ids"


def _dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's attention scores are in (an additive mask is built in it, as transformers does)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if weight is not None and weight.is_floating_point() else torch.float32


def _report_fallback(model: nn.Module, layout: str, reason: str) -> None:
    key = (type(model).__name__, layout, reason)
    if key not in _reported:
        _reported.add(key)
        log.warning("train.layout=%s: %s %s; using the padded layout", layout, type(model).__name__, reason)


# ----------------------------------------------------------------------------------------------------------
# building the inputs


def padded_inputs(batch: PreferenceBatch) -> LayoutInputs:
    return LayoutInputs("padded", batch.input_ids, batch.attention_mask, None, None)


def _sequence_lengths(batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
    """Per-row (total, prompt) lengths of a right-padded batch."""
    lengths = batch.attention_mask.sum(-1)
    positions = torch.arange(batch.input_ids.shape[1], device=lengths.device)
    if not torch.equal(batch.attention_mask.bool(), positions[None, :] < lengths[:, None]):
        raise ValueError("layouts need a right-padded batch (collate_pairs builds one)")
    return lengths, lengths - batch.response_mask.sum(-1)


def packed_inputs(batch: PreferenceBatch, *, mask_kind: str | None, dtype: torch.dtype = torch.float32) -> LayoutInputs:
    """All sequences in one row. ``mask_kind`` "bool"/"additive" adds a block-diagonal causal 4D mask;
    None leaves confinement to the model, from the restarting position ids."""
    rows, width = batch.input_ids.shape
    lengths, _ = _sequence_lengths(batch)
    real = batch.attention_mask.bool()
    positions = torch.arange(width, device=real.device).expand(rows, width)
    starts = lengths.cumsum(0) - lengths  # where each sequence begins in the packed row
    source = starts[:, None] + torch.arange(width - 1, device=real.device)[None, :]
    mask = None
    if mask_kind is not None:
        sequence_of = torch.repeat_interleave(torch.arange(rows, device=real.device), lengths)
        mask = _attention_mask(sequence_of[None, :], mask_kind, dtype)
    return LayoutInputs("packed", batch.input_ids[real][None, :], mask, positions[real][None, :], source)


def prefix_shared_inputs(batch: PreferenceBatch, *, mask_kind: str, dtype: torch.dtype = torch.float32) -> LayoutInputs:
    """One row per pair: prompt, chosen, rejected; rejected tokens masked from chosen ones, their
    positions restarting after the prompt."""
    pairs, width = batch.num_pairs, batch.input_ids.shape[1]
    lengths, prompts = _sequence_lengths(batch)
    _check_shared_prompts(batch, prompts)
    prompt = prompts[:pairs, None]
    chosen_end = lengths[:pairs, None]  # prompt + chosen
    chosen = chosen_end - prompt
    row_end = chosen_end + (lengths[pairs:, None] - prompt)  # prompt + chosen + rejected
    j = torch.arange(int(row_end.max()), device=lengths.device)[None, :]
    in_chosen, in_rejected = j < chosen_end, (j >= chosen_end) & (j < row_end)
    # Rejected token k of the layout row is token k - len(chosen) of the collated rejected row.
    from_chosen = batch.input_ids[:pairs].gather(1, j.clamp(max=width - 1).expand(pairs, -1))
    from_rejected = batch.input_ids[pairs:].gather(1, (j - chosen).clamp(0, width - 1))
    zeros = torch.zeros_like(from_chosen)
    input_ids = torch.where(in_chosen, from_chosen, torch.where(in_rejected, from_rejected, zeros))
    # Padding gets position 0: any valid position does (its outputs are never read), and a large one
    # could overrun a learned position table.
    position_ids = torch.where(in_chosen, j, torch.where(in_rejected, j - chosen, zeros))
    # Segments: 0 prompt, 1 chosen, 2 rejected, 3 padding. A token sees earlier tokens of the prompt and
    # of its own segment; padding sees only padding and the prompt, never a row with nothing to attend.
    segment = torch.where(j < prompt, 0, torch.where(in_chosen, 1, torch.where(in_rejected, 2, 3)))
    layout_width = input_ids.shape[1]
    t = torch.arange(width - 1, device=lengths.device)[None, :]
    row_start = torch.arange(pairs, device=lengths.device)[:, None] * layout_width
    # The first rejected token is predicted from the last prompt position, the others from the previous
    # rejected token, which sits len(chosen) further along than in the collated row.
    chosen_source = row_start + t
    rejected_source = row_start + t + chosen * (t >= prompt)
    source = torch.cat([chosen_source, rejected_source])
    return LayoutInputs("prefix_shared", input_ids, _attention_mask(segment, mask_kind, dtype, shared=0),
                        position_ids, source)


def _check_shared_prompts(batch: PreferenceBatch, prompts: Tensor) -> None:
    pairs = batch.num_pairs
    same_length = torch.equal(prompts[:pairs], prompts[pairs:])
    in_prompt = torch.arange(batch.input_ids.shape[1], device=prompts.device)[None, :] < prompts[:pairs, None]
    same_tokens = bool(((batch.input_ids[:pairs] == batch.input_ids[pairs:]) | ~in_prompt).all())
    if not (same_length and same_tokens):
        raise ValueError("prefix sharing needs each pair's chosen and rejected rows to share their prompt")


def _attention_mask(segment: Tensor, kind: str, dtype: torch.dtype, shared: int | None = None) -> Tensor:
    """(R, 1, L, L) causal mask from per-token segment ids (R, L): a query sees earlier keys of its own
    segment, and of the ``shared`` segment when there is one. "bool" for sdpa (True attends), "additive"
    for eager (0 attends, the dtype's minimum does not)."""
    length = segment.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    same = segment[:, :, None] == segment[:, None, :]
    if shared is not None:
        same = same | (segment[:, None, :] == shared)
    allowed = (same & causal)[:, None]
    if kind == "bool":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=segment.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)
