"""Building blocks of SAPO, self-augmented preference optimization (Yin et al., arXiv 2405.20830).

SAPO needs only (prompt, preferred response) data: each rejected response is made by letting an EMA copy
of the policy rewrite one segment of the preferred one, and training batches are drawn from a replay buffer
of such pairs. This module holds the pure parts (no model, no I/O), so each can be checked by hand:

- :class:`ReplayBuffer`: a FIFO of generated pairs, sampled with probability proportional to
  ``1 / (1 + times_sampled)``.
- :func:`cut_point`, :func:`generation_prompt`, :func:`compose_rejected`: segment-level augmentation.
  With the preferred response ``y+`` cut into A = ``y+[:t]``, B = ``y+[t:t+L]`` and C = ``y+[t+L:]``, the
  EMA model continues ``prompt + A`` for up to L tokens (B'), and the rejected response is A + B' + C,
  or A + B' when B' ends the response with EOS.
- :func:`reference_refresh_due` / :func:`augmentation_due`: the step schedules.

The EMA model itself is :class:`prefopt.reference.following.FollowingWeights`: ``ema_update(policy, decay)`` does
``ema <- decay * ema + (1 - decay) * policy``, so ``decay`` is SAPO's ``ema_beta`` (0.5 in its configs).

One optimizer step of SAPO, in the order the reference implementation uses:
1. EMA update from the policy (once per optimizer step, before anything else of that step);
2. every :data:`REFERENCE_REFRESH_EVERY` steps (step 0 included), the DPO reference <- the EMA weights;
3. every ``sample_every_n_steps`` steps (1 by default), augment the step's data with the EMA model and add
   the pairs to the buffer;
4. draw the training batch from the buffer (the pairs just added have the largest weight) and take the
   DPO (or ORPO) loss with the real response as chosen and the generated one as rejected.

Deliberate differences from the reference implementation (each kept small):
- sampling counts are kept per buffer slot, not per Python object id, so they survive a resume;
- ``sample`` draws distinct pairs by default (``replacement=True`` gives the reference's draw with
  repetition); either way at most ``len(buffer)`` pairs come back, as in the reference;
- a cut-point upper bound below 0 gives ``t = 0`` instead of an error.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

#: Capacity of the replay buffer in the reference configs.
DEFAULT_MAX_SIZE = 2000
#: Segment length L (tokens the EMA model generates) in the reference configs.
DEFAULT_SEGMENT_LEN = 256
#: ``ema_beta``: weight on the old EMA weights at each update (``FollowingWeights.ema_update``'s ``decay``).
DEFAULT_EMA_DECAY = 0.5
#: The DPO reference is refreshed from the EMA weights every this many optimizer steps.
REFERENCE_REFRESH_EVERY = 108
#: Tokens kept after the rewritten segment at the least: the cut point is at most ``len(y+) - 3 - L``.
TAIL_MARGIN = 3
#: Sampling settings of the EMA model's segment generation.
GENERATION_KWARGS = {"do_sample": True, "temperature": 0.7, "top_p": 0.95, "top_k": 50}


def _token_tuple(ids: Iterable[int], what: str) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of token ids, not text")
    values = list(ids)
    if any(isinstance(i, bool) or int(i) != i for i in values):
        raise TypeError(f"{what} must hold integer token ids")
    return tuple(int(i) for i in values)


@dataclass(frozen=True)
class ReplayItem:
    """One generated pair: the prompt, the real (chosen) response, the generated (rejected) response, and
    the data row it came from. Token ids are stored as tuples of ints."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    row: int

    def __post_init__(self) -> None:
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            object.__setattr__(self, name, _token_tuple(getattr(self, name), name))
        object.__setattr__(self, "row", int(self.row))

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_ids": list(self.prompt_ids),
            "chosen_ids": list(self.chosen_ids),
            "rejected_ids": list(self.rejected_ids),
            "row": self.row,
        }


class ReplayBuffer:
    """A FIFO of at most ``max_size`` generated pairs, each with the number of times it has been drawn.

    Positions run from 0 (the oldest pair) to ``len(self) - 1`` (the newest). A draw picks pairs with
    probability proportional to ``1 / (1 + times_sampled)`` (:meth:`weights`), then adds one to the count
    of every pair drawn.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE):
        if int(max_size) < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        self.max_size = int(max_size)
        self._items: deque[ReplayItem] = deque(maxlen=self.max_size)
        self._counts: deque[int] = deque(maxlen=self.max_size)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, position: int) -> ReplayItem:
        return self._items[position]

    def items(self) -> list[ReplayItem]:
        """The pairs, oldest first."""
        return list(self._items)

    def times_sampled(self) -> list[int]:
        """How often each pair has been drawn, oldest first."""
        return list(self._counts)

    def add(self, items: Iterable[ReplayItem]) -> None:
        """Append pairs (as new, never drawn); beyond ``max_size`` the oldest are evicted first."""
        for item in items:
            if not isinstance(item, ReplayItem):
                raise TypeError(f"ReplayBuffer.add takes ReplayItem objects, got {type(item).__name__}")
            self._items.append(item)  # a full deque drops its leftmost (oldest) entry
            self._counts.append(0)

    def weights(self) -> torch.Tensor:
        """The unnormalized draw weights ``1 / (1 + times_sampled)``, float64, oldest first."""
        counts = torch.tensor(list(self._counts), dtype=torch.float64)
        return 1.0 / (1.0 + counts)

    def sample(self, k: int, generator: torch.Generator, *, replacement: bool = False) -> list[int]:
        """Draw ``min(k, len(self))`` positions with probability proportional to :meth:`weights`.

        Without replacement (the default) the positions are distinct: drawn one after the other, each from
        the pairs not drawn yet, in proportion to their weights. With ``replacement=True`` every draw uses
        the same weights and a pair may repeat, as in the reference implementation. The weights are those
        from before this call either way; afterwards each drawn position's count goes up by one per time
        it was drawn. The result, in draw order, depends only on the buffer and the generator's state.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not self._items:
            raise ValueError("cannot sample from an empty replay buffer")
        n = min(int(k), len(self._items))
        drawn = torch.multinomial(self.weights(), n, replacement=replacement, generator=generator).tolist()
        for position in drawn:
            self._counts[position] += 1
        return drawn

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serializable snapshot: capacity, pairs (oldest first) and their counts."""
        return {
            "max_size": self.max_size,
            "items": [
                {**item.to_dict(), "times_sampled": count} for item, count in zip(self._items, self._counts)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the contents with a snapshot from :meth:`state_dict` (keeping this buffer's capacity;
        a snapshot larger than it keeps its newest pairs)."""
        self._items.clear()
        self._counts.clear()
        for entry in state["items"]:
            count = int(entry.get("times_sampled", 0))
            if count < 0:
                raise ValueError(f"times_sampled must be non-negative, got {count}")
            self._items.append(
                ReplayItem(entry["prompt_ids"], entry["chosen_ids"], entry["rejected_ids"], entry["row"])
            )
            self._counts.append(count)


def effective_segment_len(response_len: int, segment_len: int) -> int:
    """The segment length actually used for a response: ``min(segment_len, response_len)``."""
    if segment_len < 1:
        raise ValueError(f"segment_len must be at least 1, got {segment_len}")
    if response_len < 0:
        raise ValueError(f"response_len must be non-negative, got {response_len}")
    return min(segment_len, response_len)


def cut_point(
    response_len: int, segment_len: int, rng: torch.Generator, *, max_cut: Optional[int] = None
) -> int:
    """Where segment A ends: ``t ~ U{0, ..., len(y+) - 3 - L}`` (both ends included), L the effective
    segment length; ``t = 0`` when that bound is below 1 (responses shorter than ``L + 4`` tokens).

    ``max_cut`` further caps t (the reference uses ``max_length - prompt_len - L`` so that prompt, A and the
    generated segment fit in ``max_length``); a cap below 0 also gives 0. ``response_len`` counts the
    response as trained on, EOS included.
    """
    seg = effective_segment_len(response_len, segment_len)
    high = response_len - TAIL_MARGIN - seg
    if max_cut is not None:
        high = min(high, int(max_cut))
    if high <= 0:
        return 0
    return int(torch.randint(0, high + 1, (1,), generator=rng).item())


def generation_prompt(prompt_ids: Sequence[int], chosen_ids: Sequence[int], t: int) -> tuple[int, ...]:
    """What the EMA model continues: the prompt then segment A, ``prompt_ids + chosen_ids[:t]``."""
    if not 0 <= t <= len(chosen_ids):
        raise ValueError(f"cut point {t} is outside a response of {len(chosen_ids)} tokens")
    return tuple(int(i) for i in prompt_ids) + tuple(int(i) for i in chosen_ids[:t])


def compose_rejected(
    chosen_ids: Sequence[int],
    t: int,
    segment_len: int,
    generated_ids: Sequence[int],
    eos_ids: Union[int, Collection[int]],
) -> tuple[int, ...]:
    """The rejected response built from the chosen one cut at ``t``.

    B' is the first L generated tokens (L the effective segment length; any more are ignored). If B'
    holds an EOS token, the response is A + B' up to and including its first EOS. Otherwise it is
    A + B' + C with C = ``chosen_ids[t + L:]``: C starts L tokens after the cut even when B' is shorter
    than L.
    """
    if not 0 <= t <= len(chosen_ids):
        raise ValueError(f"cut point {t} is outside a response of {len(chosen_ids)} tokens")
    eos = {int(eos_ids)} if isinstance(eos_ids, int) else {int(i) for i in eos_ids}
    seg = effective_segment_len(len(chosen_ids), segment_len)
    chosen = tuple(int(i) for i in chosen_ids)
    segment = tuple(int(i) for i in generated_ids[:seg])
    for i, token in enumerate(segment):
        if token in eos:
            return chosen[:t] + segment[: i + 1]
    return chosen[:t] + segment + chosen[t + seg :]


def _due(step: int, every: int) -> bool:
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    return step % every == 0


def reference_refresh_due(step: int, every: int = REFERENCE_REFRESH_EVERY) -> bool:
    """Whether the reference is set to the EMA weights at this optimizer step (0-based: steps 0, every,
    2 * every, ...), right after that step's EMA update."""
    return _due(step, every)


def augmentation_due(step: int, every: int = 1) -> bool:
    """Whether this optimizer step (0-based) generates new pairs for the buffer (``sample_every_n_steps``)."""
    return _due(step, every)
