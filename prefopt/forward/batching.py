"""Tokenized pairs -> padded batches in which chosen and rejected go through the model in one forward.

Row i of a batch of B pairs is pair i's chosen sequence and row B + i its rejected sequence, each the
shared prompt followed by the response, right-padded. ``response_mask`` marks the tokens whose
log-probs count (the response, EOS included); the prompt and the padding never do.

Unpaired examples batch the same way (their completion as chosen, the mismatched completion as
rejected) and carry their labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from prefopt.data.types import TokenizedPair


@dataclass
class PreferenceBatch:
    input_ids: Tensor  # (2B, T) long
    attention_mask: Tensor  # (2B, T) long
    response_mask: Tensor  # (2B, T) bool: True where the token is a response token
    indices: Tensor  # (B,) long: each pair's position in its TokenizedPairs (reference-cache key)
    labels: Tensor | None = None  # (B,) bool: desirable or not, for unpaired examples; None for pairs

    @property
    def num_pairs(self) -> int:
        return self.indices.numel()

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        return PreferenceBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            self.indices,
            None if self.labels is None else self.labels.to(device),
        )

    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())


def pad_token_ids(
    sequences: Sequence[Sequence[int]], pad_id: int | None, *, side: Literal["right", "left"] = "right",
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, long (N, T), of token-id lists padded to the longest, on ``device``.

    Right padding (scoring) keeps every real token at its own position, so a causal model's outputs at real
    tokens equal an unpadded forward's; left padding (generation) lines up every row's last prompt token, where
    ``generate`` continues.

    ``pad_id`` may be None only where no row needs padding (one sequence, or all the same length); otherwise
    it is an error rather than a silent id 0. The attention mask hides the padding from a causal LM, but a
    sequence classifier (a reward model) finds each row's last real token as the last that is not its pad
    id, and would score a row padded with another real token's id at the wrong position.
    """
    if side not in ("right", "left"):
        raise ValueError(f"pad_token_ids: side must be 'right' or 'left', got {side!r}")
    width = max(len(ids) for ids in sequences)
    if pad_id is None and any(len(ids) != width for ids in sequences):
        raise ValueError("pad_token_ids: sequences of different lengths need a pad_id (the tokenizer has no pad "
                         "or EOS token); pad one sequence at a time instead")
    input_ids = torch.full((len(sequences), width), 0 if pad_id is None else pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        span = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        input_ids[row, span] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids.to(device), attention_mask.to(device)


def pad_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(prompt, response) id sequences, right-padded: input ids, attention mask and response mask."""
    input_ids, attention_mask = pad_token_ids([[*prompt, *response] for prompt, response in sequences], pad_id)
    response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        response_mask[row, len(prompt) : len(prompt) + len(response)] = True
    return input_ids, attention_mask, response_mask


def collate_pairs(pairs: Sequence[TokenizedPair], indices: Sequence[int], pad_id: int) -> PreferenceBatch:
    """Pad ``pairs`` into one batch: all chosen sequences first, then all rejected ones."""
    if any(not p.chosen_ids and not p.rejected_ids for p in pairs):
        # a prompt-only example: its loss would be over no tokens, a step that silently learns nothing
        raise ValueError("collate_pairs: a pair without a response (prompt-only data) cannot be trained or "
                         "scored; an algorithm must pair its prompts with sampled responses first")
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    input_ids, attention_mask, response_mask = pad_sequences(sequences, pad_id)
    labels = None
    if pairs and pairs[0].label is not None:
        labels = torch.tensor([p.label for p in pairs], dtype=torch.bool)
    return PreferenceBatch(
        input_ids, attention_mask, response_mask, torch.tensor(list(indices), dtype=torch.long), labels
    )
