"""Reference providers: where the reference log-probs of a batch come from.

- ``LiveReference``: a frozen model, or the policy itself with its LoRA adapter disabled (no extra
  memory), run on every batch.
- ``CachedReference`` (``prefopt.reference.cache``): every pair's reference log-probs computed once by a
  live reference and kept in an on-disk, content-addressed cache.
- ``FollowingReference`` (``prefopt.reference.following``): the policy's own weights, synced into it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from prefopt.forward.batching import PreferenceBatch
from prefopt.forward.logprobs import SequenceLogps, sequence_logps


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
