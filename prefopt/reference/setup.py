"""Which references a run holds its policy to, built from the recipe's ``reference`` section.

A run has one *primary* reference and, for a loss that declares ``multi_reference`` (MRPO), the extra
models listed in ``reference.extra``. The primary reference is one of

- a cache: log-probs computed once (by the initial policy, the policy with its LoRA adapter off, or the
  model at ``reference.path``) into the content-addressed on-disk cache; the default;
- live: the same models run on every batch (an adapter that does not start as the identity, e.g. an
  existing SFT adapter, as a frozen copy of its initial tensors: ``prefopt.models.peft.reference_is_base``);
- following: the policy's own weights, synced into the reference every ``reference.sync.every`` steps
  (TR-DPO), kept by ``prefopt.reference.following``; it cannot be cached because it changes.

Extra references are computed into the cache *before* the policy is loaded and freed right after, so a
multi-reference run holds no more models in memory while it trains than a single-reference one.
"""

from __future__ import annotations

import copy
import gc
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from prefopt.forward.batching import PreferenceBatch
from prefopt.data.types import TokenizedPairs
from prefopt.errors import PrefoptError
from prefopt.reference.following import FollowingReference
from prefopt.forward.logprobs import SequenceLogps
from prefopt.models.loading import base_weights_fingerprint, is_peft, load_causal_lm, load_tokenizer, resolve_model_path
from prefopt.models.peft import initial_weights_fingerprint, reference_is_base
from prefopt.reference.cache import CachedReference, cached_reference
from prefopt.reference.providers import LiveReference

log = logging.getLogger(__name__)


@dataclass
class ReferenceSet:
    """The references of one split (train or eval): primary first. Calling it scores a batch under each."""

    providers: list[Any]
    following: FollowingReference | None = None

    def __call__(self, batch: PreferenceBatch) -> list[SequenceLogps]:
        return [provider(batch) for provider in self.providers]

    @property
    def forward_passes(self) -> int:
        return sum(p.forward_passes for p in self.providers)


@dataclass
class References:
    """What ``setup`` gets back: the references of the training and held-out splits and of each named eval
    set (``eval.sets``), and a description for the run summary."""

    train: ReferenceSet
    eval: ReferenceSet | None
    info: dict[str, Any] = field(default_factory=dict)
    eval_sets: dict[str, ReferenceSet] = field(default_factory=dict)


def check_reference_recipe(recipe, loss, sharded: bool) -> None:
    """Refuse combinations that cannot give the reference the recipe asks for, before any model loads."""
    r = recipe.reference
    if r.extra and not loss.multi_reference:
        raise PrefoptError(
            f"reference.extra lists {len(r.extra)} model(s) but loss {loss.name!r} uses one reference; remove "
            "reference.extra or pick a multi-reference loss (prefopt list)"
        )
    if loss.multi_reference and not r.extra:
        raise PrefoptError(
            f"loss {loss.name!r} compares several references: list the models beyond the primary one in "
            "reference.extra (hub ids or local directories)"
        )
    if r.sync is None:
        return
    if r.kind == "cache":
        raise PrefoptError("reference.sync moves the reference during training, so it cannot be cached: "
                           "set reference.kind=live (or auto)")
    if r.path is not None:
        raise PrefoptError("reference.sync makes the reference follow the policy from the policy's own initial "
                           "weights; remove reference.path")
    if sharded:
        raise PrefoptError("reference.sync needs the whole policy on each process, which FSDP or ZeRO-3 do not "
                           "hold; train with DDP or drop reference.sync")


def build_extra_caches(recipe, tokenizer, splits: list[TokenizedPairs | None], device, show_progress: bool,
                       say: Callable[[str], None], main_process_first) -> tuple[list[list[CachedReference | None]], list]:
    """Each ``reference.extra`` model's log-probs over every split, into the cache; one model in memory at a
    time, freed before the next (and before the policy loads). Returns caches[extra][split] and summaries."""
    caches, info = [], []
    r, m = recipe.reference, recipe.model
    for path in r.extra:
        resolved = resolve_model_path(path)
        _check_same_vocabulary(path, resolved, tokenizer, m.trust_remote_code)
        model = load_causal_lm(resolved, dtype=m.dtype, trust_remote_code=m.trust_remote_code).to(device)
        model.requires_grad_(False)
        live = LiveReference(model, chunk_size=recipe.train.logprob_chunk_size)
        fingerprint = base_weights_fingerprint(model)
        per_split, hits = [], []
        for pairs in splits:
            if pairs is None:
                per_split.append(None)
                continue
            cached, hit = cached_reference(
                live, pairs, weights=fingerprint, dtype=f"{m.dtype}/{recipe.train.mixed_precision}",
                batch_size=r.batch_size, pad_id=tokenizer.pad_token_id, device=device, show_progress=show_progress,
                main_process_first=main_process_first, say=say, label=f"reference {path}",
            )
            hits.append(hit)
            per_split.append(cached)
        info.append({"source": path, "hit": all(hits), "forward_passes": live.forward_passes})
        caches.append(per_split)
        del live, model  # freed before the next model loads
        gc.collect()
    return caches, info


def _check_same_vocabulary(name: str, path: str, tokenizer, trust_remote_code: bool) -> None:
    """Every reference scores the policy's token ids, so their vocabularies must be the same."""
    theirs = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise PrefoptError(
            f"reference.extra {name!r} has a different tokenizer vocabulary from model.path; every reference "
            "must score the same token ids, so use models that share the policy's tokenizer"
        )


def build_primary(recipe, accelerator, policy, tokenizer, train_pairs, eval_pairs, show_progress,
                  say, following: bool = False, eval_sets: dict[str, TokenizedPairs] | None = None,
                  ) -> tuple[Any, Any, FollowingReference | None, dict[str, Any], dict[str, Any]]:
    """The primary reference for training and evaluation, the following reference if any, a summary, and the
    primary reference of each named eval set (``eval_sets``: a cache of its own for each, as for the held-out
    split). ``policy`` is the initial policy, not yet wrapped for distribution. ``following``: a reference
    that follows the policy although the recipe sets no ``reference.sync`` (an algorithm syncs it)."""
    r, eval_sets = recipe.reference, eval_sets or {}
    if r.sync is not None or following:
        primary_train, primary_eval, followed, info = _following_primary(recipe, accelerator, policy, say)
        return primary_train, primary_eval, followed, info, dict.fromkeys(eval_sets, primary_eval)
    kind = "cache" if r.kind == "auto" else r.kind
    live, source = _primary_model(recipe, accelerator, policy, kind)
    info: dict[str, Any] = {"kind": kind, "source": source}
    if kind == "live":
        say(f"reference: {source}, computed live every step")
        return live, live, None, info, dict.fromkeys(eval_sets, live)

    fingerprint = _reference_fingerprint(live)
    info["weights"] = fingerprint  # sha256 of the reference's weights (an adapter's only where it is part of them)
    caches = []
    splits = [(None, train_pairs), (None, eval_pairs), *eval_sets.items()]
    for set_name, pairs in splits:
        if pairs is None:
            caches.append(None)
            continue
        cached, hit = cached_reference(
            live, pairs, weights=fingerprint, dtype=f"{recipe.model.dtype}/{recipe.train.mixed_precision}",
            batch_size=r.batch_size, pad_id=tokenizer.pad_token_id, device=accelerator.device,
            show_progress=show_progress, main_process_first=accelerator.main_process_first, say=say,
        )
        say(f"reference: {'reusing' if hit else 'built'} cache {cached.path}")
        caches.append(cached)
        entry = {"path": str(cached.path), "hit": hit}
        info.setdefault("caches", []).append(entry if set_name is None else {**entry, "eval_set": set_name})
    info["forward_passes"] = live.forward_passes
    return caches[0], caches[1], None, info, dict(zip(eval_sets, caches[2:]))


def _following_primary(recipe, accelerator, policy, say) -> tuple[Any, Any, FollowingReference, dict[str, Any]]:
    """The policy's own weights as the reference, synced by ``reference.sync`` or by the algorithm."""
    r = recipe.reference
    reference = FollowingReference(policy, chunk_size=recipe.train.logprob_chunk_size,
                                   autocast=accelerator.autocast, layout=recipe.train.layout)
    if r.sync is None:
        say("reference: follows the policy, synced by the algorithm")
        return reference, reference, reference, {"kind": "following", "source": "policy", "sync": "algorithm"}
    alpha = 1.0 if r.sync.mode == "hard" else r.sync.alpha
    say(f"reference: follows the policy ({r.sync.mode} sync, alpha {alpha}, every {r.sync.every} steps)")
    info = {"kind": "following", "source": "policy", "sync": r.sync.model_dump()}
    return reference, reference, reference, info


def _primary_model(recipe, accelerator, policy, kind: str) -> tuple[LiveReference | FollowingReference, str]:
    """The model that gives the primary reference's log-probs (live, or once into the cache), and its name."""
    r = recipe.reference
    options = {"chunk_size": recipe.train.logprob_chunk_size, "autocast": accelerator.autocast}
    # A live reference scores batches in the training layout; a cache is always built padded, so its numbers
    # depend only on what its key hashes (the layouts agree to float rounding, but a cache is exact).
    if kind == "live":
        options["layout"] = recipe.train.layout
    if r.path is not None:
        ref_model = load_causal_lm(
            resolve_model_path(r.path), dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code
        ).to(accelerator.device)
        ref_model.requires_grad_(False)
        return LiveReference(ref_model, **options), r.path
    if is_peft(policy) and reference_is_base(recipe.model):
        # The adapter starts as the identity, so the base model is the initial policy, at no extra memory.
        peft_type = recipe.model.peft["type"] if recipe.model.peft is not None else "LORA"
        name = "LoRA" if peft_type == "LORA" else peft_type
        return LiveReference(policy, disable_adapter=True, **options), f"policy with its {name} adapter disabled"
    if is_peft(policy) and kind == "live":
        # The adapter as it starts is part of the reference (an existing adapter, PiSSA, OLoRA): the policy
        # run with a copy of its initial adapter tensors in place of its own, the exact initial policy at the
        # cost of one adapter (a merged copy would cost a model; a second peft adapter would change which
        # parameters train when switched to). It follows nothing: no sync ever moves it.
        return FollowingReference(policy, **options), "policy with a frozen copy of its initial adapter"
    if is_peft(policy):
        # Not trained yet: the policy, adapter on, is the initial model.
        return LiveReference(policy, **options), "initial policy (base weights and adapter)"
    if kind == "live":
        frozen = copy.deepcopy(policy).requires_grad_(False)
        return LiveReference(frozen, **options), "frozen copy of the initial policy"
    # The policy has not trained yet, so it *is* the initial model: no copy needed to fill the cache.
    return LiveReference(policy, **options), "initial policy"


def _reference_fingerprint(live: LiveReference) -> str:
    """The cache key's weights: the base weights alone where the adapter is off, else every tensor of the
    model as it starts, so a different initial adapter (another SFT adapter, another PiSSA rank) gets
    another cache."""
    if is_peft(live.model) and not live.disable_adapter:
        return initial_weights_fingerprint(live.model)
    return base_weights_fingerprint(live.model)


def assemble(primary_train, primary_eval, following, extra_caches, info, extra_info,
             primary_sets: dict[str, Any] | None = None) -> References:
    """Primary and extra references put together per split. ``extra_caches[i]`` holds extra reference i's caches
    of the training split, the held-out split, then each named eval set in ``primary_sets``' order."""
    train = ReferenceSet([primary_train] + [c[0] for c in extra_caches], following)
    evaluation = None
    if primary_eval is not None:
        evaluation = ReferenceSet([primary_eval] + [c[1] for c in extra_caches], following)
    eval_sets = {
        name: ReferenceSet([primary] + [c[2 + i] for c in extra_caches], following)
        for i, (name, primary) in enumerate((primary_sets or {}).items())
    }
    if extra_info:
        info = {**info, "extra": extra_info}
    return References(train, evaluation, info, eval_sets)


def sync_due(recipe, step_done: int) -> bool:
    """Whether the following reference syncs after optimizer step ``step_done`` (1-based)."""
    sync = recipe.reference.sync
    return sync is not None and step_done % sync.every == 0
