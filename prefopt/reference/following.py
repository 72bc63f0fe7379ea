"""A reference that follows the policy: TR-DPO's hard and soft syncs, and an EMA of the policy.

The reference keeps its own copy of the policy's *trainable* weights only: every parameter of a fully
fine-tuned model, or just the LoRA adapter under PEFT (the frozen base weights are shared, so a following
reference of a LoRA policy costs the adapter's size, not the model's). Its log-probs are the policy
module run with those weights substituted (``torch.func.functional_call``), which swaps the tensors for
the duration of the call without touching the policy's parameters or any autograd graph built from them.

Updates, each applied to every followed tensor:
- soft sync (TR-DPO, Gorbatovski et al., arXiv 2404.09656):  ref <- alpha * policy + (1 - alpha) * ref
- hard sync: ref <- policy (bitwise; alpha = 1)
- EMA with decay d: a soft sync with alpha = 1 - d every step (SAPO's EMA model).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from prefopt.forward.batching import PreferenceBatch
from prefopt.forward.logprobs import SequenceLogps, sequence_logps


class FollowingWeights:
    """A copy of a module's trainable tensors that moves toward the module's own on request."""

    def __init__(self, module: nn.Module):
        self.tensors: dict[str, Tensor] = {
            name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad
        }
        if not self.tensors:
            raise ValueError("the policy has no trainable parameters to follow")

    @torch.no_grad()
    def sync(self, module: nn.Module, alpha: float) -> None:
        """ref <- alpha * policy + (1 - alpha) * ref for every followed tensor; alpha = 1 copies exactly."""
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        current = dict(module.named_parameters())
        for name, ref in self.tensors.items():
            policy = current[name].detach()
            if alpha == 1.0:
                ref.copy_(policy)
            else:
                # computed in float32 so a bf16 reference does not lose the small steps of an EMA
                mixed = ref.float().lerp_(policy.float(), alpha)  # ref + alpha * (policy - ref)
                ref.copy_(mixed)

    def ema_update(self, module: nn.Module, decay: float) -> None:
        """ref <- decay * ref + (1 - decay) * policy."""
        self.sync(module, 1.0 - decay)

    def state_dict(self) -> dict[str, Tensor]:
        return {name: t.detach().cpu().contiguous() for name, t in self.tensors.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state.keys() != self.tensors.keys():
            missing = sorted(self.tensors.keys() - state.keys())[:3]
            raise RuntimeError(f"following-reference weights do not fit this model (missing {missing})")
        for name, tensor in state.items():
            self.tensors[name].copy_(tensor)


class _Scorer(nn.Module):
    """Wraps a model so one ``functional_call`` covers the whole log-prob computation, head included."""

    def __init__(self, model: nn.Module, chunk_size: int, layout: str):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.layout = layout

    def forward(self, batch: PreferenceBatch) -> SequenceLogps:
        kwargs = {} if self.layout == "padded" else {"layout": self.layout}
        return sequence_logps(self.model, batch, chunk_size=self.chunk_size, **kwargs)


class FollowingReference:
    """Reference log-probs from the policy's module run with the followed weights in place of its own.

    ``module`` is the policy without any DDP wrapper: every process holds the same weights, so each can
    score its own batches. The reference runs in eval mode (no dropout) and without gradients.
    """

    def __init__(self, module: nn.Module, *, chunk_size: int = 1024, autocast=None, layout: str = "padded"):
        self.module = module
        self.weights = FollowingWeights(module)
        self.scorer = _Scorer(module, chunk_size, layout)
        self.autocast = autocast or contextlib.nullcontext
        self.forward_passes = 0

    @torch.no_grad()
    def __call__(self, batch: PreferenceBatch) -> SequenceLogps:
        substituted = {f"model.{name}": t for name, t in self.weights.tensors.items()}
        was_training = self.module.training
        self.module.eval()
        try:
            with self.autocast():
                self.forward_passes += 1
                return torch.func.functional_call(self.scorer, substituted, (batch,), strict=False)
        finally:
            self.module.train(was_training)

    def sync(self, alpha: float) -> None:
        self.weights.sync(self.module, alpha)


@contextlib.contextmanager
def substituted(module: nn.Module, tensors: dict[str, Tensor]):
    """``module`` with ``tensors`` in place of its parameters of those names for the duration, its own values
    put back bitwise after (for code that reads the module itself, e.g. ``generate`` sampling from an EMA)."""
    params = dict(module.named_parameters())
    saved = {name: params[name].detach().clone() for name in tensors}
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    try:
        yield module
    finally:
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
