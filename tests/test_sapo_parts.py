"""SAPO's building blocks, checked against values worked out by hand: the replay buffer (FIFO eviction,
1/(1 + times_sampled) sampling, counts, resume), the segment-level augmentation (cut point, the
rejected response with and without EOS in the generated segment) and the EMA update it reuses."""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction

import pytest
import torch
from torch import nn

from prefopt.reference.following import FollowingWeights
from prefopt_plugins.algorithms.sapo_parts import (
    DEFAULT_EMA_DECAY,
    REFERENCE_REFRESH_EVERY,
    ReplayBuffer,
    ReplayItem,
    augmentation_due,
    compose_rejected,
    cut_point,
    effective_segment_len,
    generation_prompt,
    reference_refresh_due,
)


def _item(row: int) -> ReplayItem:
    return ReplayItem(prompt_ids=[1, row], chosen_ids=[10 + row, 2], rejected_ids=[20 + row, 2], row=row)


def _rows(buffer: ReplayBuffer) -> list[int]:
    return [item.row for item in buffer.items()]


# ---------------------------------------------------------------- replay buffer


def test_items_store_token_ids_as_tuples_of_ints():
    item = ReplayItem(prompt_ids=[1, 2], chosen_ids=(3,), rejected_ids=torch.tensor([4, 5]).tolist(), row=7)
    assert item.prompt_ids == (1, 2) and item.chosen_ids == (3,) and item.rejected_ids == (4, 5)
    assert all(type(i) is int for i in item.prompt_ids + item.chosen_ids + item.rejected_ids)
    with pytest.raises(TypeError):
        ReplayItem(prompt_ids=[1.5], chosen_ids=[1], rejected_ids=[1], row=0)
    with pytest.raises(TypeError):
        ReplayItem(prompt_ids="abc", chosen_ids=[1], rejected_ids=[1], row=0)


def test_fifo_evicts_the_oldest_first_and_their_counts_with_them():
    buffer = ReplayBuffer(max_size=3)
    buffer.add([_item(0), _item(1)])
    assert len(buffer) == 2 and _rows(buffer) == [0, 1]
    # Give the pairs distinct counts by hand-editing through a snapshot: row0 drawn 5 times, row1 once.
    state = buffer.state_dict()
    state["items"][0]["times_sampled"] = 5
    state["items"][1]["times_sampled"] = 1
    buffer.load_state_dict(state)

    buffer.add([_item(2), _item(3)])  # 4 pairs for 3 slots: row 0 (the oldest) goes
    assert _rows(buffer) == [1, 2, 3]
    assert buffer.times_sampled() == [1, 0, 0]  # row 1 keeps its count, the new ones start at 0

    buffer.add([_item(4), _item(5), _item(6), _item(7)])  # more than the capacity in one call
    assert _rows(buffer) == [5, 6, 7] and buffer.times_sampled() == [0, 0, 0]
    assert buffer[0].row == 5 and buffer[-1].row == 7


def test_weights_are_one_over_one_plus_times_sampled_exactly():
    buffer = ReplayBuffer(max_size=10)
    buffer.add([_item(0), _item(1), _item(2)])
    state = buffer.state_dict()
    for entry, count in zip(state["items"], [0, 1, 3]):
        entry["times_sampled"] = count
    buffer.load_state_dict(state)
    # weights 1/(1+0), 1/(1+1), 1/(1+3) = 1, 1/2, 1/4; sum 7/4 -> probabilities 4/7, 2/7, 1/7
    weights = buffer.weights()
    assert weights.dtype == torch.float64
    assert weights.tolist() == [1.0, 0.5, 0.25]
    probs = [Fraction(w).limit_denominator(100) / Fraction(7, 4) for w in weights.tolist()]
    assert probs == [Fraction(4, 7), Fraction(2, 7), Fraction(1, 7)]


def _three_with_counts(counts) -> ReplayBuffer:
    buffer = ReplayBuffer(max_size=10)
    buffer.add([_item(0), _item(1), _item(2)])
    state = buffer.state_dict()
    for entry, count in zip(state["items"], counts):
        entry["times_sampled"] = count
    buffer.load_state_dict(state)
    return buffer


def test_single_draws_follow_one_over_one_plus_n_statistically():
    # Counts 0, 1, 3 -> probabilities 4/7, 2/7, 1/7 (previous test). Each draw starts from the same
    # counts (the snapshot is restored), so 7000 draws should give about 4000, 2000 and 1000.
    buffer = _three_with_counts([0, 1, 3])
    snapshot = buffer.state_dict()
    generator = torch.Generator().manual_seed(0)
    hits = Counter()
    n = 7000
    for _ in range(n):
        buffer.load_state_dict(snapshot)
        (position,) = buffer.sample(1, generator)
        hits[position] += 1
    for position, p in enumerate([4 / 7, 2 / 7, 1 / 7]):
        sd = (n * p * (1 - p)) ** 0.5  # binomial: 41.4, 37.8, 29.3
        assert abs(hits[position] - n * p) < 4.5 * sd, (position, hits)


def test_two_distinct_draws_follow_sequential_weighted_sampling_statistically():
    # Weights 1, 1/2, 1/4 (sum 7/4). Drawing two distinct pairs one after the other:
    # P({0,1}) = P(0)P(1|0 gone) + P(1)P(0|1 gone) = 4/7 * (1/2)/(3/4) + 2/7 * 1/(5/4) = 8/21 + 8/35 = 64/105
    # P({0,2}) = 4/7 * (1/4)/(3/4) + 1/7 * 1/(3/2) = 4/21 + 2/21 = 30/105
    # P({1,2}) = 2/7 * (1/4)/(5/4) + 1/7 * (1/2)/(3/2) = 2/35 + 1/21 = 11/105
    expected = {(0, 1): 64 / 105, (0, 2): 30 / 105, (1, 2): 11 / 105}
    buffer = _three_with_counts([0, 1, 3])
    snapshot = buffer.state_dict()
    generator = torch.Generator().manual_seed(1)
    hits = Counter()
    n = 6000
    for _ in range(n):
        buffer.load_state_dict(snapshot)
        drawn = buffer.sample(2, generator)
        assert len(set(drawn)) == 2
        hits[tuple(sorted(drawn))] += 1
    for pair, p in expected.items():
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(hits[pair] - n * p) < 4.5 * sd, (pair, hits)


def test_sampling_increments_times_sampled_of_the_drawn_pairs_only():
    buffer = ReplayBuffer(max_size=10)
    buffer.add([_item(r) for r in range(4)])
    generator = torch.Generator().manual_seed(3)
    drawn = buffer.sample(2, generator)
    assert len(drawn) == 2 and len(set(drawn)) == 2
    assert buffer.times_sampled() == [1 if p in drawn else 0 for p in range(4)]

    # Asking for more than the buffer holds gives every pair once (at most len(buffer) come back).
    drawn = buffer.sample(10, generator)
    assert sorted(drawn) == [0, 1, 2, 3]
    assert sum(buffer.times_sampled()) == 2 + 4

    # With replacement a pair may repeat, and its count rises once per time it was drawn.
    before = buffer.times_sampled()
    repeats = False
    for _ in range(50):
        before = buffer.times_sampled()
        drawn = buffer.sample(4, generator, replacement=True)
        assert len(drawn) == 4
        multiplicity = Counter(drawn)
        repeats |= max(multiplicity.values()) > 1
        assert buffer.times_sampled() == [before[p] + multiplicity[p] for p in range(4)]
    assert repeats  # 50 draws of 4 from 4 with replacement: some repeat (all distinct has p < 0.1 each)


def test_sampling_errors():
    buffer = ReplayBuffer(max_size=2)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="empty"):
        buffer.sample(1, generator)
    buffer.add([_item(0)])
    with pytest.raises(ValueError):
        buffer.sample(0, generator)
    with pytest.raises(ValueError):
        ReplayBuffer(max_size=0)
    with pytest.raises(TypeError):
        buffer.add([(1, 2, 3)])


def test_same_generator_state_gives_the_same_draws():
    def draws(seed):
        buffer = ReplayBuffer(max_size=10)
        buffer.add([_item(r) for r in range(6)])
        generator = torch.Generator().manual_seed(seed)
        return [buffer.sample(3, generator) for _ in range(5)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_state_round_trip_through_json_then_identical_draws():
    buffer = ReplayBuffer(max_size=4)
    buffer.add([_item(r) for r in range(6)])  # rows 2..5 remain
    generator = torch.Generator().manual_seed(11)
    for _ in range(3):
        buffer.sample(2, generator)

    state = json.loads(json.dumps(buffer.state_dict()))  # JSON-serializable as is
    assert state["max_size"] == 4
    assert [entry["row"] for entry in state["items"]] == [2, 3, 4, 5]
    assert sum(entry["times_sampled"] for entry in state["items"]) == 6
    generator_state = generator.get_state()

    resumed = ReplayBuffer(max_size=4)
    resumed.load_state_dict(state)
    assert resumed.items() == buffer.items() and resumed.times_sampled() == buffer.times_sampled()
    resumed_generator = torch.Generator()
    resumed_generator.set_state(generator_state)

    for new_rows in ([6], [7, 8], []):
        buffer.add([_item(r) for r in new_rows])
        resumed.add([_item(r) for r in new_rows])
        assert buffer.sample(3, generator) == resumed.sample(3, resumed_generator)
    assert resumed.items() == buffer.items() and resumed.times_sampled() == buffer.times_sampled()


def test_loading_into_a_smaller_buffer_keeps_the_newest():
    big = ReplayBuffer(max_size=5)
    big.add([_item(r) for r in range(5)])
    small = ReplayBuffer(max_size=2)
    small.load_state_dict(big.state_dict())
    assert _rows(small) == [3, 4] and small.max_size == 2


# ---------------------------------------------------------------- segment-level augmentation


def test_cut_point_bounds_over_many_draws():
    # len(y+) = 20, L = 5: t ~ U{0, ..., 20 - 3 - 5 = 12}; 2600 draws, 200 expected per value.
    generator = torch.Generator().manual_seed(0)
    draws = [cut_point(20, 5, generator) for _ in range(2600)]
    assert min(draws) == 0 and max(draws) == 12
    counts = Counter(draws)
    assert sorted(counts) == list(range(13))
    assert all(130 < c < 270 for c in counts.values()), counts  # sd ~ 13.9 per value


def test_cut_point_of_short_responses_is_zero():
    generator = torch.Generator().manual_seed(0)
    # 8 - 3 - 5 = 0 and 7 - 3 - 5 = -1: no room, t = 0
    assert {cut_point(8, 5, generator) for _ in range(50)} == {0}
    assert {cut_point(7, 5, generator) for _ in range(50)} == {0}
    # shorter than L: L becomes the response length (4), 4 - 3 - 4 < 0
    assert effective_segment_len(4, 256) == 4
    assert {cut_point(4, 256, generator) for _ in range(50)} == {0}
    assert cut_point(0, 5, generator) == 0
    # 9 - 3 - 5 = 1: t is 0 or 1, both seen
    assert {cut_point(9, 5, generator) for _ in range(200)} == {0, 1}


def test_cut_point_respects_max_cut():
    generator = torch.Generator().manual_seed(0)
    draws = {cut_point(20, 5, generator, max_cut=4) for _ in range(500)}
    assert draws == {0, 1, 2, 3, 4}
    assert {cut_point(20, 5, generator, max_cut=-3) for _ in range(20)} == {0}
    assert {cut_point(20, 5, generator, max_cut=100) for _ in range(2000)} == set(range(13))


def test_cut_point_is_deterministic_for_a_generator_state():
    a = torch.Generator().manual_seed(5)
    b = torch.Generator().manual_seed(5)
    assert [cut_point(300, 256, a) for _ in range(20)] == [cut_point(300, 256, b) for _ in range(20)]


EOS = 2
# y+ with EOS appended: 9 tokens. With t = 2, L = 3: A = (10, 11), B = (12, 13, 14), C = (15, 16, 17, 2).
CHOSEN = (10, 11, 12, 13, 14, 15, 16, 17, EOS)


def test_generation_prompt_is_prompt_then_segment_a():
    assert generation_prompt((1, 3), CHOSEN, 2) == (1, 3, 10, 11)
    assert generation_prompt([1, 3], CHOSEN, 0) == (1, 3)
    with pytest.raises(ValueError):
        generation_prompt((1,), CHOSEN, 10)


def test_compose_rejected_without_eos_appends_segment_c():
    # A + B' + C = (10, 11) + (50, 51, 52) + (15, 16, 17, 2)
    assert compose_rejected(CHOSEN, 2, 3, (50, 51, 52), EOS) == (10, 11, 50, 51, 52, 15, 16, 17, EOS)
    # tokens past L are not part of B': (50, 51, 52) kept, 53 dropped
    assert compose_rejected(CHOSEN, 2, 3, (50, 51, 52, 53), EOS) == (10, 11, 50, 51, 52, 15, 16, 17, EOS)
    # an EOS past the first L tokens does not count either
    assert compose_rejected(CHOSEN, 2, 3, [50, 51, 52, EOS], EOS) == (10, 11, 50, 51, 52, 15, 16, 17, EOS)
    # a B' shorter than L without EOS: C still starts at t + L = 5
    assert compose_rejected(CHOSEN, 2, 3, (50, 51), EOS) == (10, 11, 50, 51, 15, 16, 17, EOS)
    # t = 0: A empty; C = y+[3:]
    assert compose_rejected(CHOSEN, 0, 3, (50, 51, 52), EOS) == (50, 51, 52, 13, 14, 15, 16, 17, EOS)


def test_compose_rejected_stops_after_an_eos_in_the_generated_segment():
    # B' = (50, EOS, 52): cut right after its first EOS, no C
    assert compose_rejected(CHOSEN, 2, 3, (50, EOS, 52), EOS) == (10, 11, 50, EOS)
    # EOS as the first generated token
    assert compose_rejected(CHOSEN, 2, 3, (EOS, 51, 52), EOS) == (10, 11, EOS)
    # several EOS ids (e.g. <|eot_id|> besides </s>): either ends the response
    assert compose_rejected(CHOSEN, 2, 3, (50, 7, 52), {EOS, 7}) == (10, 11, 50, 7)
    assert compose_rejected(CHOSEN, 2, 3, (50, 7, 52), [EOS]) == (10, 11, 50, 7, 52, 15, 16, 17, EOS)


def test_compose_rejected_with_a_segment_longer_than_the_response():
    # y+ = (10, 11, 2), L = 256 -> L = 3; t = 0; B' = first 3 generated tokens; C = y+[3:] = ()
    assert compose_rejected((10, 11, EOS), 0, 256, (60, 61, 62, 63), EOS) == (60, 61, 62)
    assert compose_rejected((10, 11, EOS), 0, 256, (60, EOS), EOS) == (60, EOS)
    with pytest.raises(ValueError):
        compose_rejected((10, 11, EOS), 4, 256, (60,), EOS)


def test_augmentation_end_to_end_on_tokens():
    # cut point from the generator, prompt for the EMA model, then the rejected response: every
    # rejected response starts with A and, without EOS, ends with C.
    generator = torch.Generator().manual_seed(2)
    chosen = tuple(range(100, 130)) + (EOS,)  # 31 tokens
    for _ in range(50):
        t = cut_point(len(chosen), 8, generator)
        assert 0 <= t <= 31 - 3 - 8
        prompt = generation_prompt((1, 3), chosen, t)
        assert prompt[2:] == chosen[:t]
        generated = tuple(range(900, 908))
        rejected = compose_rejected(chosen, t, 8, generated, EOS)
        assert rejected == chosen[:t] + generated + chosen[t + 8 :]
        assert len(rejected) == len(chosen) and len(chosen[t + 8 :]) >= 3


# ---------------------------------------------------------------- schedules and the EMA model


def test_reference_refresh_and_augmentation_schedules():
    assert REFERENCE_REFRESH_EVERY == 108
    assert [s for s in range(400) if reference_refresh_due(s)] == [0, 108, 216, 324]
    assert [s for s in range(7) if reference_refresh_due(s, every=3)] == [0, 3, 6]
    assert all(augmentation_due(s) for s in range(10))
    assert [s for s in range(7) if augmentation_due(s, every=2)] == [0, 2, 4, 6]
    with pytest.raises(ValueError):
        reference_refresh_due(5, every=0)


def _set_linear(layer: nn.Linear, w0: float, w1: float, b: float) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[w0, w1]]))
        layer.bias.copy_(torch.tensor([b]))


def _ema_values(ema: FollowingWeights) -> list[float]:
    return ema.tensors["weight"].flatten().tolist() + ema.tensors["bias"].tolist()


def test_following_weights_ema_update_is_sapo_ema_with_decay_beta():
    # SAPO: theta_ema <- (1 - beta) * theta + beta * theta_ema, with beta = decay = 0.5.
    assert DEFAULT_EMA_DECAY == 0.5
    policy = nn.Linear(2, 1)
    _set_linear(policy, 0.0, 4.0, 8.0)
    ema = FollowingWeights(policy)  # theta_ema = (0, 4, 8)
    assert _ema_values(ema) == [0.0, 4.0, 8.0]

    _set_linear(policy, 2.0, 0.0, 0.0)
    ema.ema_update(policy, 0.5)
    # 0.5 * (2, 0, 0) + 0.5 * (0, 4, 8) = (1, 2, 4)
    assert _ema_values(ema) == [1.0, 2.0, 4.0]

    _set_linear(policy, 4.0, 2.0, -4.0)
    ema.ema_update(policy, 0.5)
    # 0.5 * (4, 2, -4) + 0.5 * (1, 2, 4) = (2.5, 2, 0)
    assert _ema_values(ema) == [2.5, 2.0, 0.0]
    # the policy is left alone
    assert policy.weight.flatten().tolist() == [4.0, 2.0] and policy.bias.tolist() == [-4.0]


def test_ema_decay_weights_the_old_ema_not_the_policy():
    # beta = 0.75 tells the two readings apart: 0.25 * (4, 0, 0) + 0.75 * (0, 4, 8) = (1, 3, 6)
    # (the other reading, 0.75 * policy + 0.25 * ema, would give (3, 1, 2)).
    policy = nn.Linear(2, 1)
    _set_linear(policy, 0.0, 4.0, 8.0)
    ema = FollowingWeights(policy)
    _set_linear(policy, 4.0, 0.0, 0.0)
    ema.ema_update(policy, 0.75)
    assert _ema_values(ema) == [1.0, 3.0, 6.0]
