"""The reference cache: every pair's reference log-probs, computed once by a live reference and kept on disk.

A cache file is content-addressed: its key hashes the reference weights, the tokenized data (which covers
the tokenizer and truncation settings), the dtype and the log-prob code version, so a cache is never stale
and is shared by every run, variant and benchmark entry that would compute the same numbers. A cache file
appears by atomic rename only once complete, so an interrupted build leaves nothing behind but a temporary
file (removed by the next build). Its sha256 is kept beside it (``<key>.safetensors.sha256``) and checked
before every use: a damaged file (a flipped bit, a cut-off copy) is rebuilt, never read. One process builds an
entry at a time (``<key>.safetensors.lock``); another that wants it waits, then finds it.
``cached_reference`` is the one way callers get a cache: find and check it, build it if missing or damaged,
open it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Callable, ContextManager

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from prefopt.data.types import TokenizedPairs
from prefopt.forward.batching import PreferenceBatch, collate_pairs
from prefopt.forward.logprobs import SequenceLogps
from prefopt.integrity import checksum_path, verify_checksum, write_checksum
from prefopt.locks import build_lock
from prefopt.paths import atomic_file, cache_dir, remove_stale_temps
from prefopt.reference.providers import LiveReference

# Bump when the numbers a reference produces for the same inputs change (e.g. a new log-prob path).
CACHE_FORMAT_VERSION = 1


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


def cached_reference(
    live: LiveReference,
    pairs: TokenizedPairs,
    *,
    weights: str,
    dtype: str,
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    main_process_first: Callable[[], ContextManager] = contextlib.nullcontext,
    say: Callable[[str], None] = lambda line: None,
    label: str = "reference",
) -> tuple[CachedReference, bool]:
    """The cache of ``live``'s log-probs over ``pairs``, built first if missing or damaged, and whether a
    whole one was found.

    ``weights`` is the reference's weights fingerprint and ``dtype`` the numeric setting, both parts of the
    key. Under several processes ``main_process_first`` lets one build while the others wait, then find
    it; runs that share the cache take turns by the entry's lock. ``say`` reports a build, prefixed by
    ``label``, and a damaged file.
    """
    path = cache_path(cache_key(weights, pairs, dtype))
    with main_process_first(), build_lock(path, say):  # one process builds, the others then find it
        remove_stale_temps(path.parent)  # what builders that were killed left
        hit = path.exists() and _whole(path, say)
        if not hit:
            say(f"{label}: computing log-probs of {len(pairs)} pairs once into {path}")
            build_cache(live, pairs, path, batch_size=batch_size, pad_id=pad_id, device=device,
                        show_progress=show_progress)
    return CachedReference(path), hit


def _whole(path: Path, say: Callable[[str], None]) -> bool:
    """Whether the cache file at ``path`` is as it was written; a damaged one is said and removed."""
    problem = verify_checksum(path)
    if problem is None:
        return True
    state = "cannot be checked" if not checksum_path(path).exists() else "is damaged"
    say(f"reference cache {path} {state} ({problem}); rebuilding")
    path.unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)
    return False


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
    """Compute every pair's reference log-probs and write them to ``path`` atomically, then its checksum."""
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
    with atomic_file(path) as tmp:  # readers see no file or a complete one
        save_file(tensors, str(tmp), metadata={"pairs": str(n), "source": pairs.source})
    try:
        write_checksum(path)
    except BaseException:
        path.unlink(missing_ok=True)  # a cache without its checksum would be rebuilt anyway: free the space now
        raise


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
