"""Tokenized pairs -> padded batches in which chosen and rejected go through the model in one forward.

Row i of a batch of B pairs is pair i's chosen sequence and row B + i its rejected sequence, each the
shared prompt followed by the response, right-padded. ``response_mask`` marks the tokens whose
log-probs count (the response, EOS included); the prompt and the padding never do.

Unpaired examples batch the same way (their completion as chosen, the mismatched completion as
rejected) and carry their labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


def pad_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(prompt, response) id sequences, right-padded: input ids, attention mask and response mask."""
    width = max(len(prompt) + len(response) for prompt, response in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor([*prompt, *response], dtype=torch.long)
        attention_mask[row, :length] = 1
        response_mask[row, len(prompt) : length] = True
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
