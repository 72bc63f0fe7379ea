"""TRL parity harness: a real ``trl.DPOTrainer`` (TRL 1.16) whose ``_compute_loss`` runs on log-probs we choose.

TRL's own code runs as is: ``DPOTrainer.__init__`` (config, loss types, precomputed-reference mode) and all
of ``_compute_loss``: labels from the completion mask, the per-sequence sums (or LD-DPO weighting) of the
per-token log-probs, the chosen/rejected split (chosen rows first), the reference log-probs read from the
batch, the f-divergence transform, the loss loop and its batch mean, the logged ``rewards/*`` metrics and
the backward graph. Only the policy forward is stubbed (``FusedHeadStub``): it returns float64 per-token
log-probs we drew instead of a network's, and prefopt is given the same numbers.

Building a trainer takes most of a second, so a test module builds one (a module-scoped fixture) and
``trl_compute_loss`` sets the loss's hyperparameters on it before each call, on exactly the attributes
``DPOTrainer.__init__`` copies them to from ``DPOConfig``. That skips ``__init__``'s checks on combinations
(which loss types accept an f-divergence, EXO's non-zero smoothing), none of which changes a number; each
module's fixture builds its trainer from a real config of the loss it tests, so those checks run once.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from prefopt import LossOutput, PairLogps

F64 = torch.float64


class FusedHeadStub(nn.Module):
    """Stands in for the policy that TRL patches with its fused LM head (``add_fused_lm_head``).

    TRL calls ``model(**inputs, labels=labels, fused_lm_head=True)`` and reads ``.log_probs`` (2B, T-1):
    per-token log-probs of the next token, 0 where ``labels == -100`` (prompt and padding). This stub returns
    log-probs we chose instead of running a network, plus the metric-only outputs TRL also reads
    (``entropy``, ``mean_logits``, ``is_top1``), which do not touch the loss.
    """

    def __init__(self, per_token_logps: torch.Tensor) -> None:
        super().__init__()
        self.per_token_logps = per_token_logps
        self.calls: list[dict] = []

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        zeros = torch.zeros_like(self.per_token_logps.detach())
        return SimpleNamespace(
            log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def random_preference_batch(pairs: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """A collated TRL batch (chosen rows first, then rejected) with random per-token log-probs in float64.

    Each row has a random prompt length and completion length; the per-token log-probs are drawn in [-4, 0)
    on completion positions (shifted by one, as next-token log-probs are) and are 0 elsewhere, as TRL's
    fused head returns them. Reference log-probs are random sums in [-40, -5).
    """
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    completion_mask = torch.zeros(rows, length, dtype=torch.long)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    for i in range(rows):
        prompt_len = int(torch.randint(1, length // 2, (1,), generator=gen))
        completion_len = int(torch.randint(1, length - prompt_len + 1, (1,), generator=gen))
        completion_mask[i, prompt_len : prompt_len + completion_len] = 1
        attention_mask[i, : prompt_len + completion_len] = 1
    input_ids = torch.randint(3, 100, (rows, length), generator=gen) * attention_mask
    shift_mask = completion_mask[:, 1:].to(F64)
    per_token_logps = -4 * torch.rand(rows, length - 1, generator=gen, dtype=F64) * shift_mask
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": -5 - 35 * torch.rand(pairs, generator=gen, dtype=F64),
        "ref_rejected_logps": -5 - 35 * torch.rand(pairs, generator=gen, dtype=F64),
        "per_token_logps": per_token_logps.requires_grad_(True),
    }


def near_reference(batch: dict[str, torch.Tensor], per_token_logps: torch.Tensor, spread: float,
                   seed: int) -> dict[str, torch.Tensor]:
    """``batch`` with reference sums drawn within +-``spread`` of the policy's sums: log-ratios of a few
    nats, as early in training, for losses that exponentiate them (f-DPO's forward KL and alpha)."""
    gen = torch.Generator().manual_seed(seed)
    sums = per_token_logps.detach().sum(1)
    noise = spread * (2 * torch.rand(sums.shape, generator=gen, dtype=F64) - 1)
    ref = (sums.to(F64) + noise).to(sums.dtype)
    pairs = ref.shape[0] // 2
    return {**batch, "ref_chosen_logps": ref[:pairs], "ref_rejected_logps": ref[pairs:]}


def random_reference_token_logps(batch: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    """Per-token reference log-probs (2B, T-1) for ``batch``: in [-4, 0) on completion positions, 0 elsewhere.

    For losses that weight tokens (LD-DPO), whose reference log-probs are not plain sums."""
    gen = torch.Generator().manual_seed(seed)
    shift_mask = batch["completion_mask"][:, 1:].to(F64)
    return -4 * torch.rand(shift_mask.shape, generator=gen, dtype=F64) * shift_mask


def trl_dpo_trainer(model_dir, tokenizer, beta: float, output_dir, **config):
    """A real trl.DPOTrainer (``loss_type="sigmoid"`` unless ``config`` says otherwise) on the tiny model,
    with reference log-probs precomputed, so that ``_compute_loss`` reads them from the batch instead of
    running a reference model. ``config`` holds further ``DPOConfig`` fields."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = Dataset.from_dict({"prompt": ["The movie was"] * 2, "chosen": [" good."] * 2, "rejected": [" bad."] * 2})
    settings = dict(
        output_dir=str(output_dir), beta=beta, loss_type=["sigmoid"], precompute_ref_log_probs=True,
        report_to=[], bf16=False, use_cpu=True, per_device_train_batch_size=2, disable_tqdm=True,
    )
    settings.update(config)
    args = DPOConfig(**settings)
    return DPOTrainer(model=str(model_dir), args=args, train_dataset=rows, processing_class=tokenizer)


# The DPOConfig fields a loss reads, with TRL 1.16's defaults, and where DPOTrainer.__init__ copies them.
TRL_DEFAULTS = dict(
    beta=0.1, loss_types=["sigmoid"], loss_weights=None, label_smoothing=0.0, ld_alpha=None,
    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05,
)


def configure(trainer, **hyperparameters) -> None:
    """Set the loss hyperparameters on a built trainer; every one not given goes back to TRL's default,
    so tests do not depend on each other's order. ``loss_weights=None`` means 1.0 per loss type, as in
    ``DPOTrainer.__init__``; ``discopop_tau`` is read from ``trainer.args`` there, so it is set there."""
    unknown = set(hyperparameters) - set(TRL_DEFAULTS)
    assert not unknown, f"not a DPOTrainer loss attribute: {sorted(unknown)}"
    values = {**TRL_DEFAULTS, **hyperparameters}
    values["loss_weights"] = values["loss_weights"] or [1.0] * len(values["loss_types"])
    tau = values.pop("discopop_tau")
    for name, value in values.items():
        assert hasattr(trainer, name), f"TRL's DPOTrainer no longer has {name!r}: check _compute_loss"
        setattr(trainer, name, value)
    trainer.args.discopop_tau = tau


@dataclass
class TRLResult:
    loss: torch.Tensor  # TRL's batch loss (a scalar)
    grad: torch.Tensor  # d loss / d per-token policy log-probs, (2B, T-1)
    metrics: dict[str, float]  # what this call logged


def trl_compute_loss(trainer, batch: dict[str, torch.Tensor], per_token_logps: torch.Tensor,
                     **hyperparameters) -> TRLResult:
    """Run TRL's ``_compute_loss`` on ``batch`` with the stub policy returning ``per_token_logps``."""
    configure(trainer, **hyperparameters)
    leaf = per_token_logps.detach().clone().requires_grad_(True)
    stub = FusedHeadStub(leaf)
    loss = trainer._compute_loss(stub, dict(batch), return_outputs=False)
    assert stub.calls and stub.calls[0]["fused_lm_head"] is True  # TRL really called the policy
    (grad,) = torch.autograd.grad(loss, leaf)
    mode = "train" if trainer.model.training else "eval"
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    return TRLResult(loss.detach(), grad, metrics)


def trl_reference_logps(trainer, batch: dict[str, torch.Tensor], ref_token_logps: torch.Tensor,
                        **hyperparameters) -> dict[str, torch.Tensor]:
    """``batch`` with its reference sums replaced by what TRL's own ``compute_ref_log_probs`` makes of
    ``ref_token_logps`` (the LD-DPO weighting when ``ld_alpha`` is set), as its precompute step does."""
    configure(trainer, **hyperparameters)
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(FusedHeadStub(ref_token_logps), dict(batch))
    return {**batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}


def prefopt_pair_logps(batch: dict[str, torch.Tensor], per_token_logps: torch.Tensor, *,
                       ref_token_logps: torch.Tensor | None = None,
                       token_level: bool = False) -> tuple[PairLogps, torch.Tensor]:
    """The same numbers as prefopt's engine would hand a loss, and the leaf to differentiate against.

    Sums and token counts come from the per-token log-probs and the shifted completion mask (as
    ``prefopt.forward.logprobs`` computes them); reference sums from ``ref_token_logps`` when given, else from the
    batch. ``token_level`` adds the per-token tensors and masks (for losses with ``requires_token_logps``).
    Everything is float64: a float32 batch is upcast here, so prefopt runs at full precision.
    """
    leaf = per_token_logps.detach().to(F64).clone().requires_grad_(True)
    mask = batch["completion_mask"][:, 1:].bool()
    pairs = mask.shape[0] // 2
    sums, counts = leaf.sum(1), mask.sum(1).to(F64)
    if ref_token_logps is not None:
        ref_sums = ref_token_logps.to(F64).sum(1)
        ref_chosen, ref_rejected = ref_sums[:pairs], ref_sums[pairs:]
    else:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"].to(F64), batch["ref_rejected_logps"].to(F64)
    fields = dict(
        policy_chosen=sums[:pairs], policy_rejected=sums[pairs:],
        chosen_tokens=counts[:pairs], rejected_tokens=counts[pairs:],
        ref_chosen=ref_chosen, ref_rejected=ref_rejected,
    )
    if token_level:
        assert ref_token_logps is not None, "token-level losses need per-token reference log-probs"
        ref = ref_token_logps.to(F64)
        fields.update(
            policy_chosen_token_logps=leaf[:pairs], policy_rejected_token_logps=leaf[pairs:],
            ref_chosen_token_logps=ref[:pairs], ref_rejected_token_logps=ref[pairs:],
            chosen_mask=mask[:pairs], rejected_mask=mask[pairs:],
        )
    return PairLogps(**fields), leaf


def pair_logps_of(pc, pr, rc, rr, *, chosen_tokens=None, rejected_tokens=None,
                  requires_grad: bool = False) -> PairLogps:
    """PairLogps from plain lists, in float64, for hand-worked values; token counts default to 1."""
    as_tensor = lambda v: torch.tensor(v, dtype=F64, requires_grad=requires_grad)  # noqa: E731
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = map(as_tensor, (pc, pr, rc, rr))
    ones = [1.0] * len(pc)
    return PairLogps(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected,
        chosen_tokens=torch.tensor(chosen_tokens or ones, dtype=F64),
        rejected_tokens=torch.tensor(rejected_tokens or ones, dtype=F64),
        ref_chosen=ref_chosen, ref_rejected=ref_rejected,
    )


def assert_matches_trl(out: LossOutput, leaf: torch.Tensor, trl: TRLResult, *, atol: float = 1e-6,
                       reward_offset: float = 0.0, informative: bool = True,
                       grad_positions: torch.Tensor | None = None) -> None:
    """prefopt's per-pair losses, averaged as the engine averages them, equal TRL's batch loss; so do the
    gradients with respect to the per-token log-probs, and the logged reward means, margins and accuracy.

    ``reward_offset`` is subtracted from prefopt's rewards before comparing (for a TRL run whose reference
    was shifted on purpose). ``informative`` also checks the draw has rewards of both signs.
    ``grad_positions`` (bool, like the per-token log-probs) limits the gradient comparison to those positions.
    """
    ours = out.loss.mean()
    (our_grad,) = torch.autograd.grad(ours, leaf)
    assert ours.dtype == F64
    assert ours.item() == pytest.approx(trl.loss.item(), abs=atol, rel=0)
    trl_grad = trl.grad.to(F64)
    if grad_positions is not None:
        our_grad, trl_grad = our_grad[grad_positions], trl_grad[grad_positions]
    torch.testing.assert_close(our_grad, trl_grad, rtol=0, atol=atol)
    chosen, rejected = out.chosen_rewards - reward_offset, out.rejected_rewards - reward_offset
    m = trl.metrics
    assert chosen.mean().item() == pytest.approx(m["rewards/chosen"], abs=atol, rel=0)
    assert rejected.mean().item() == pytest.approx(m["rewards/rejected"], abs=atol, rel=0)
    assert (chosen - rejected).mean().item() == pytest.approx(m["rewards/margins"], abs=atol, rel=0)
    accuracy = (chosen > rejected).to(F64).mean().item()
    assert accuracy == pytest.approx(m["rewards/accuracies"], abs=1e-6)  # TRL averages it in float32
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    if informative:
        assert 0 < accuracy < 1


# ----------------------------------------------------------------------------------------------------------
# WPO weighting (TRL's ``use_weighting``): the weights need the policy's whole next-token distributions, which
# TRL 1.16 reads as ``log_sum_sq_probs`` from its fused LM head. These helpers draw next-token logits and derive
# both sides' inputs from them: TRL's through its own kernel, prefopt's through its engine's function.


def random_next_token_logits(batch: dict[str, torch.Tensor], vocab: int, seed: int,
                             boost: float = 8.0) -> torch.Tensor:
    """Next-token logits (2B, T-1, ``vocab``) in float64 for ``batch``: standard normal, with each row's target
    tokens (``input_ids[:, 1:]``) raised by a row level drawn in [0, ``boost``) plus per-token noise in [0, 1).
    Rows with a low level are unlikely responses (WPO weight below 1), rows with a high one near-argmax
    responses (weight above 1), so a batch exercises both sides of WPO's clamp."""
    gen = torch.Generator().manual_seed(seed)
    targets = batch["input_ids"][:, 1:]
    assert int(targets.max()) < vocab, "the vocabulary must hold every input id"
    logits = torch.randn(*targets.shape, vocab, generator=gen, dtype=F64)
    level = boost * torch.rand(targets.shape[0], 1, generator=gen, dtype=F64)
    raise_by = level + torch.rand(targets.shape, generator=gen, dtype=F64)
    return logits.scatter_add(-1, targets.unsqueeze(-1), raise_by.unsqueeze(-1))


def engine_token_logps(batch: dict[str, torch.Tensor], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token log-probs, per-token log sum_v p_v^2), each (2B, T-1) and 0 outside the completion, computed
    from ``logits`` by the function prefopt's engine scores every chunk with (``prefopt.forward.logprobs``), in float64."""
    from prefopt.forward.logprobs import _selected_logps

    mask = batch["completion_mask"][:, 1:].bool()
    targets = batch["input_ids"][:, 1:]
    logps, log_collision = _selected_logps(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), True)
    return logps.view(mask.shape).masked_fill(~mask, 0), log_collision.view(mask.shape).masked_fill(~mask, 0)


def trl_log_sum_sq_probs(batch: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """log sum_v p_v^2 (2B, T-1) as TRL 1.16's fused LM head computes it from ``logits``: TRL's own kernel
    (``trl.kernels.ChunkedLogProbFunction``; torch path on CPU, float32 statistics, so float32 output) run with
    the logits as hidden states and an identity head, then zeroed where the label is -100 as
    ``add_fused_lm_head`` does."""
    from trl.kernels import ChunkedLogProbFunction

    mask = batch["completion_mask"][:, 1:].bool()
    targets = batch["input_ids"][:, 1:].reshape(-1)
    vocab = logits.shape[-1]
    with torch.no_grad():
        _, _, log_sum_sq_probs, _, _ = ChunkedLogProbFunction.apply(
            logits.reshape(-1, vocab), torch.eye(vocab, dtype=logits.dtype), None, targets, 1.0, vocab, None, 1.0,
            ("log_probs", "log_sum_sq_probs"),
        )
    return log_sum_sq_probs.view(mask.shape).masked_fill(~mask, 0)


class WeightingHeadStub(FusedHeadStub):
    """``FusedHeadStub`` that also returns ``log_sum_sq_probs`` (2B, T-1), the one output TRL 1.16 adds under
    ``use_weighting``: ``_compute_loss`` builds the WPO weights from ``(per_token_logps - log_sum_sq_probs)
    * shift_completion_mask`` under ``torch.no_grad()``."""

    def __init__(self, per_token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor) -> None:
        super().__init__(per_token_logps)
        self.log_sum_sq_probs = log_sum_sq_probs

    def forward(self, **kwargs):
        outputs = super().forward(**kwargs)
        outputs.log_sum_sq_probs = self.log_sum_sq_probs
        return outputs


def trl_compute_weighted_loss(trainer, batch: dict[str, torch.Tensor], per_token_logps: torch.Tensor,
                              log_sum_sq_probs: torch.Tensor, **hyperparameters) -> TRLResult:
    """``trl_compute_loss`` with TRL's WPO weighting on (``use_weighting=True``, restored afterwards): the stub
    policy returns ``per_token_logps`` and ``log_sum_sq_probs``."""
    configure(trainer, **hyperparameters)
    leaf = per_token_logps.detach().clone().requires_grad_(True)
    stub = WeightingHeadStub(leaf, log_sum_sq_probs)
    weighting, trainer.use_weighting = trainer.use_weighting, True
    try:
        loss = trainer._compute_loss(stub, dict(batch), return_outputs=False)
    finally:
        trainer.use_weighting = weighting
    assert stub.calls and stub.calls[0]["fused_lm_head"] is True
    (grad,) = torch.autograd.grad(loss, leaf)
    mode = "train" if trainer.model.training else "eval"
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    return TRLResult(loss.detach(), grad, metrics)


def prefopt_pair_logps_with_collision(batch: dict[str, torch.Tensor], per_token_logps: torch.Tensor,
                                      token_log_collision: torch.Tensor) -> tuple[PairLogps, torch.Tensor]:
    """``prefopt_pair_logps`` plus what the engine adds for a loss declaring ``requires_token_log_collision``:
    the policy's per-token log-probs (views of the leaf), the response masks and log sum_v p_v^2 per token."""
    from dataclasses import replace

    logps, leaf = prefopt_pair_logps(batch, per_token_logps)
    mask = batch["completion_mask"][:, 1:].bool()
    collision = token_log_collision.detach().to(F64)
    pairs = mask.shape[0] // 2
    return replace(
        logps,
        policy_chosen_token_logps=leaf[:pairs], policy_rejected_token_logps=leaf[pairs:],
        chosen_mask=mask[:pairs], rejected_mask=mask[pairs:],
        policy_chosen_token_log_collision=collision[:pairs], policy_rejected_token_log_collision=collision[pairs:],
    ), leaf
