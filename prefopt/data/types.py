"""The shapes preference data takes on its way from rows to batches."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Union

Messages = list[dict]  # [{"role": ..., "content": ...}, ...]
Text = Union[str, Messages]


@dataclass(frozen=True)
class PreferenceExample:
    """One usable row, normalized: prompt and responses are both strings or both message lists.

    Paired data has ``label`` None. An unpaired example (a completion labelled desirable or not) has
    ``label`` set and its completion in ``chosen``; ``rejected`` is None as read from the rows, and is
    filled with another example's completion (the mismatched pair KTO estimates its KL term from) by
    ``prefopt.data.unpaired.for_loss`` before tokenization. A prompt-only example (``data.format:
    prompt_only``) has only its prompt: ``chosen`` and ``rejected`` are None, for an algorithm that samples
    and judges the responses itself.
    """

    row: int  # 0-based row number in its source split, for error messages
    prompt: Text
    chosen: Text | None  # None only for a prompt-only example
    rejected: Text | None
    label: bool | None = None  # desirable (True) or undesirable (False); None for paired data

    @property
    def prompt_only(self) -> bool:
        """Whether this is a prompt with no response (every other kind has a chosen response)."""
        return self.chosen is None


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair; the prompt is shared, responses follow it (EOS included when appended).

    For unpaired data ``chosen_ids`` is the example's completion, ``rejected_ids`` the mismatched
    completion and ``label`` says whether the completion is desirable. A prompt-only example has empty
    ``chosen_ids`` and ``rejected_ids``: nothing to train on until an algorithm pairs it with sampled
    responses (``collate_pairs`` refuses it). Every other pair has at least one token in each response.
    """

    row: int
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    label: bool | None = None


@dataclass
class TokenizedPairs:
    """A tokenized split plus what was left out and why, and a hash of everything in it."""

    source: str  # human-readable origin, e.g. "data/train.jsonl (split train)"
    pairs: list[TokenizedPair]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> number of rows
    first_skipped_row: dict[str, int] = field(default_factory=dict)  # reason -> first row with it
    fingerprint: str = ""  # sha256 over token ids, labels and tokenization settings (reference-cache key)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def prompt_only(self) -> bool:
        """Whether these are prompts with no responses (``data.format: prompt_only``) rather than pairs."""
        return bool(self.pairs) and not self.pairs[0].chosen_ids

    @property
    def unpaired(self) -> bool:
        """Whether these are unpaired examples (every one labelled) rather than pairs."""
        return bool(self.pairs) and self.pairs[0].label is not None

    def subset(self, indices: list[int], label: str) -> "TokenizedPairs":
        """These pairs at ``indices``, in that order, as a split of their own (e.g. one stage of stepwise
        training); ``label`` names it in messages. Its fingerprint covers the parent's and the selection."""
        selection = json.dumps([self.fingerprint, list(indices)]).encode()
        return TokenizedPairs(
            source=f"{self.source} [{label}]",
            pairs=[self.pairs[i] for i in indices],
            skipped=dict(self.skipped),
            first_skipped_row=dict(self.first_skipped_row),
            fingerprint=hashlib.sha256(selection).hexdigest(),
        )

    def describe(self) -> str:
        """'12 pairs', '12 prompts' (prompt-only data), or '24 unpaired examples (12 desirable, 12
        undesirable)', for messages."""
        if self.prompt_only:
            return f"{len(self)} prompts"
        if not self.unpaired:
            return f"{len(self)} pairs"
        desirable = sum(pair.label for pair in self.pairs)
        return f"{len(self)} unpaired examples ({desirable} desirable, {len(self) - desirable} undesirable)"
