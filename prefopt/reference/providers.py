"""Reference providers: where the reference log-probs of a batch come from.

- ``LiveReference``: a frozen model, or the policy itself with its LoRA adapter disabled (no extra
  memory), run on every batch.
- ``CachedReference``: every pair's reference log-probs computed once by a live reference and kept in
  an on-disk, content-addressed cache. The key hashes the reference weights, the tokenized data (which
  covers the tokenizer and truncation settings), the dtype and the log-prob code version, so a cache is
  never stale and is shared by every run, variant and benchmark entry that would compute the same
  numbers. A cache file appears by atomic rename only once complete, so an interrupted build leaves
  nothing behind but a temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefopt.forward.batching import PreferenceBatch, collate_pairs
from prefopt.data.types import TokenizedPairs
from prefopt.forward.logprobs import SequenceLogps, sequence_logps
from prefopt.paths import cache_dir

log = logging.getLogger(__name__)

# Bump when the numbers a reference produces for the same inputs change (e.g. a new log-prob path).
CACHE_FORMAT_VERSION = 1


class LiveReference:
    """Reference log-probs computed by a model on each call, without gradients, in eval mode.

    ``disable_adapter`` runs a PEFT policy with its adapter switched off: the base weights are the
    reference, at no extra memory. ``layout`` is the batch layout of its forward (``prefopt.forward.layouts``).
    """

    def __init__(self, model: nn.Module, *, disable_adapter: bool = False, chunk_size: int = 1024, autocast=None,
                 layout: str = "padded"):
        self.model = model
        self.disable_adapter = disable_adapter
        self.chunk_size = chunk_size
        self.autocast = autocast or contextlib.nullcontext
        self.layout = layout
        self.forward_passes = 0

    @torch.no_grad()
    def __call__(self, batch: PreferenceBatch) -> SequenceLogps:
        was_training = self.model.training
        self.model.eval()  # dropout off: the reference is a fixed function
        adapter_off = self.model.disable_adapter() if self.disable_adapter else contextlib.nullcontext()
        try:
            with adapter_off, self.autocast():
                self.forward_passes += 1
                return sequence_logps(self.model, batch, chunk_size=self.chunk_size, layout=self.layout)
        finally:
            self.model.train(was_training)


def cache_key(weights_fingerprint: str, pairs: TokenizedPairs, dtype: str) -> str:
    """The content address of a reference cache: everything that changes its numbers."""
    payload = json.dumps(
        {
            "version": CACHE_FORMAT_VERSION,
            "weights": weights_fingerprint,
            "data": pairs.fingerprint,
            "dtype": dtype,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_path(key: str) -> Path:
    return cache_dir("reference") / f"{key}.safetensors"


def _length_sorted(pairs: TokenizedPairs) -> list[int]:
    """Indices ordered by longest sequence, so cache-building batches carry little padding."""
    def longest(i: int) -> int:
        p = pairs.pairs[i]
        return len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))

    return sorted(range(len(pairs)), key=longest)


def build_cache(
    reference: LiveReference, pairs: TokenizedPairs, path: Path, *, batch_size: int, pad_id: int,
    device: torch.device | str = "cpu", show_progress: bool = True,
) -> None:
    """Compute every pair's reference log-probs and write them to ``path`` atomically."""
    n = len(pairs)
    per_sequence: list[Tensor | None] = [None] * (2 * n)  # chosen i at i, rejected i at n + i
    order = _length_sorted(pairs)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    for indices in tqdm(batches, desc="reference log-probs", unit="batch", disable=not show_progress):
        batch = collate_pairs([pairs.pairs[i] for i in indices], indices, pad_id).to(device)
        result = reference(batch)
        for row, index in enumerate(indices):
            for half, offset in ((0, 0), (len(indices), n)):
                r = half + row
                per_sequence[offset + index] = result.token_logps[r][result.mask[r]].float().cpu()
    lengths = torch.tensor([t.numel() for t in per_sequence], dtype=torch.long)
    tensors = {
        "logps": torch.cat(per_sequence) if n else torch.zeros(0),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        # Sums are stored as the live path reduces them, so cached and live references agree.
        "sums": torch.stack([t.sum() for t in per_sequence]) if n else torch.zeros(0),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"pairs": str(n), "source": pairs.source})
    os.replace(tmp, path)  # atomic: readers see no file or a complete one


class CachedReference:
    """Reference log-probs read from a cache file; no model involved."""

    def __init__(self, path: Path):
        tensors = load_file(str(path))
        self.path = path
        self.logps, self.offsets, self.sums = tensors["logps"], tensors["offsets"], tensors["sums"]
        self.num_pairs = self.sums.numel() // 2
        self.forward_passes = 0

    def __call__(self, batch: PreferenceBatch) -> SequenceLogps:
        n = self.num_pairs
        sequences = torch.cat([batch.indices, batch.indices + n])  # the batch's row order
        mask = batch.response_mask[:, 1:]
        lengths = mask.sum(-1).cpu()
        expected = self.offsets[sequences + 1] - self.offsets[sequences]
        if not torch.equal(lengths, expected):
            raise RuntimeError(f"reference cache {self.path} does not match this batch's response lengths")
        flat = torch.cat([self.logps[self.offsets[s] : self.offsets[s + 1]] for s in sequences.tolist()])
        token_logps = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        token_logps = token_logps.masked_scatter(mask, flat.to(mask.device))
        return SequenceLogps(
            sums=self.sums[sequences].to(mask.device),
            token_counts=lengths.to(device=mask.device, dtype=torch.float32),
            token_logps=token_logps,
            mask=mask,
        )
