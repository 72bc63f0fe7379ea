"""benchmarks/eos_probe.py reads log p(EOS) at the right positions: checked against one forward per prefix,
which needs no index arithmetic."""

import statistics

import pytest
import torch
from conftest import tiny_config
from helpers import load_benchmark

from prefopt.data import TokenizedPair


@torch.no_grad()
def _next_eos_logp(model, ids: list[int], eos_id: int) -> float:
    """log p(EOS) as the token after ``ids``: the last position of a forward over exactly those ids."""
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)[eos_id].item()


def test_eos_logps_match_one_forward_per_prefix(tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # a wide initialization, so that p(EOS) differs from position to position by more than the tolerance
    model = LlamaForCausalLM(tiny_config(len(tokenizer), initializer_range=0.5)).eval()
    eos = tokenizer.eos_token_id
    prompt = tokenizer("The film opens with")["input_ids"]
    chosen = tokenizer(" a quiet and moving scene", add_special_tokens=False)["input_ids"] + [eos]
    rejected = tokenizer(" noise", add_special_tokens=False)["input_ids"] + [eos]
    pair = TokenizedPair(row=0, prompt_ids=tuple(prompt), chosen_ids=tuple(chosen), rejected_ids=tuple(rejected))
    got = load_benchmark("eos_probe").eos_logps(model, [pair, pair], eos)

    def at(response: list[int], k: int) -> float:  # p(EOS) in place of the response's k-th token
        return _next_eos_logp(model, prompt + response[:k], eos)

    expected = {
        "end chosen": at(chosen, len(chosen) - 1),
        "end rejected": at(rejected, len(rejected) - 1),
        "inside chosen": statistics.fmean(at(chosen, k) for k in range(len(chosen) - 1)),
        "inside rejected": statistics.fmean(at(rejected, k) for k in range(len(rejected) - 1)),
    }
    assert got == pytest.approx(expected, abs=1e-5)
    # the positions differ in what they give, so a shifted index would not pass by accident
    assert max(at(chosen, k) for k in range(len(chosen))) - min(at(chosen, k) for k in range(len(chosen))) > 0.1
