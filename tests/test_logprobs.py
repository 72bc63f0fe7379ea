"""The chunked head path must give exactly what a plain full-vocabulary log-softmax gives."""

from __future__ import annotations

import pytest
import torch

from prefopt.forward.batching import collate_pairs
from prefopt.data.types import TokenizedPair
from prefopt.forward.logprobs import sequence_logps, supports_head_path


def _batch():
    pairs = [
        TokenizedPair(0, (5, 6, 7), (8, 9, 10, 2), (11, 2)),
        TokenizedPair(1, (5,), (12, 13, 2), (14, 15, 16, 17, 2)),
        TokenizedPair(2, (5, 6, 7, 8, 9), (20, 2), (21, 22, 2)),
    ]
    return collate_pairs(pairs, [0, 1, 2], pad_id=2)


def _naive(model, batch):
    """log softmax over the whole vocabulary at every position, then the response targets summed."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logps = logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return (logps * batch.response_mask[:, 1:]).sum(-1)


def test_batch_layout_puts_chosen_rows_first_and_masks_prompt_and_padding():
    batch = _batch()
    assert batch.input_ids.shape == (6, 8)  # the longest row: pair 2's prompt (5) + rejected (3)
    assert batch.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10, 2, 2]  # right-padded with pad id 2
    assert batch.input_ids[3, :5].tolist() == [5, 6, 7, 11, 2]  # row B + 0: pair 0's rejected
    assert batch.response_mask[0].tolist() == [False] * 3 + [True] * 4 + [False]
    assert batch.response_mask[4].tolist() == [False] + [True] * 5 + [False] * 2
    assert batch.attention_mask[0].tolist() == [1] * 7 + [0]
    assert batch.attention_mask[5].tolist() == [1] * 8


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_head_path_equals_full_log_softmax(tiny_model, chunk_size):
    batch = _batch()
    assert supports_head_path(tiny_model)
    got = sequence_logps(tiny_model, batch, chunk_size=chunk_size)
    expected = _naive(tiny_model, batch)
    torch.testing.assert_close(got.sums, expected, rtol=0, atol=1e-5)
    assert got.token_counts.tolist() == [4, 3, 2, 2, 5, 3]


def test_head_path_gradients_equal_plain_path(tiny_model):
    batch = _batch()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])
    (sequence_logps(tiny_model, batch, chunk_size=2).sums * weights).sum().backward()
    head_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    (_naive(tiny_model, batch) * weights).sum().backward()
    for name, p in tiny_model.named_parameters():
        # Each gradient element is a float32 sum over positions (and, for the tied embedding, over the
        # vocabulary's softmax terms) whose addends are as large as the tensor's largest gradient. Summed in
        # another order (chunks of 2 against one full log-softmax; AVX-512 kernels block differently from
        # AVX2), a small element that comes from cancelling large addends moves by ~1e-6 of those addends:
        # measured up to 6.7e-6 x max|grad| (v_proj, 3.3e-5 on the embedding's 10.9). So the absolute
        # tolerance follows each tensor's largest gradient; a real error (a token dropped or a mask shifted)
        # moves elements by a sizeable fraction of it and still fails.
        atol = 5e-5 * p.grad.abs().max().item()
        torch.testing.assert_close(head_grads[name], p.grad, rtol=1e-4, atol=atol, msg=name)


def test_logits_path_equals_head_path(tiny_model):
    batch = _batch()
    head = sequence_logps(tiny_model, batch, use_head_path=True)
    plain = sequence_logps(tiny_model, batch, chunk_size=5, use_head_path=False)
    torch.testing.assert_close(head.token_logps, plain.token_logps, rtol=0, atol=1e-5)


def test_models_with_logit_softcapping_take_the_plain_path(tiny_model):
    tiny_model.config.final_logit_softcapping = 30.0
    assert not supports_head_path(tiny_model)


def test_lora_model_uses_adapter_and_disabling_it_gives_base(tiny_model):
    from peft import LoraConfig, get_peft_model

    batch = _batch()
    base = sequence_logps(tiny_model, batch).sums.detach()
    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with_adapter = sequence_logps(peft_model, batch).sums.detach()
    with peft_model.disable_adapter():
        without = sequence_logps(peft_model, batch).sums.detach()
    assert (with_adapter - base).abs().max() > 1e-4  # a random (non-zero) adapter changes the numbers
    torch.testing.assert_close(without, base, rtol=0, atol=1e-6)


def test_log_collision_is_log_sum_of_squared_probabilities_on_both_paths(tiny_model):
    """WPO's weight input: log sum_v p_v^2 of the next-token distribution at each response position."""
    batch = _batch()
    logits = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    expected = torch.log((logits.softmax(-1) ** 2).sum(-1)) * batch.response_mask[:, 1:]
    for head_path in (True, False):
        got = sequence_logps(tiny_model, batch, chunk_size=3, use_head_path=head_path, collision=True)
        torch.testing.assert_close(got.token_log_collision, expected, rtol=0, atol=1e-5)
        assert not got.token_log_collision.requires_grad
    assert sequence_logps(tiny_model, batch).token_log_collision is None
