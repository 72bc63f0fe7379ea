"""benchmarks/flops.py (FLOPs of a DPO step, the measured matmul limit, MFU) and the memory breakdown of
benchmarks/scaling.py: arithmetic worked out by hand; no timing is asserted."""

import pytest
import torch
from helpers import load_benchmark

flops = load_benchmark("flops")

# A tiny Llama-style decoder: q width 2 x 4 = 8 = hidden, k/v width 1 x 4 = 4 (GQA, one KV head).
TINY = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 32, "tie_word_embeddings": True}
# Per layer: q 8x8 = 64, k 4x8 = 32, v 32, o 8x8 = 64, gate 16x8 = 128, up 128, down 8x16 = 128 -> 576;
# two layers -> 1152. Head: 32 x 8 = 256.
DECODER, HEAD = 1152, 256
# (prompt, chosen, rejected) token counts of a two-pair step
PAIRS = [(3, 2, 1), (2, 4, 3)]


def test_parameters_of_the_tiny_config():
    assert flops.parameters(TINY) == {"decoder_linear": DECODER, "head": HEAD, "embedding": HEAD,
                                      "matrices": DECODER + HEAD}


def test_step_tokens_of_the_padded_layout():
    counts = flops.step_tokens(PAIRS, "padded")
    # forwarded: (3+2) + (3+1) + (2+4) + (2+3) = 20; head: response tokens 2+1+4+3 = 10;
    # sum of L^2: 5^2 + 4^2 + 6^2 + 5^2 = 25 + 16 + 36 + 25 = 102
    assert (counts["forwarded"], counts["head"], counts["sum_sq_lengths"]) == (20, 10, 102)
    # executed: 4 rows of width max(5, 4, 6, 5) = 6 -> 24 tokens, 4 x 36 = 144 attention entries
    assert counts["executed"] == {"forwarded": 24, "sum_sq_lengths": 144, "head": 10}


def test_step_tokens_of_prefix_sharing_count_the_prompt_once():
    counts = flops.step_tokens(PAIRS, "prefix_shared")
    # forwarded: (3+2+1) + (2+4+3) = 15; sum of L^2: 102 - 3^2 - 2^2 = 89 (the prompt's own attention once)
    assert (counts["forwarded"], counts["head"], counts["sum_sq_lengths"]) == (15, 10, 89)
    # executed: 2 rows of width max(6, 9) = 9 -> 18 tokens, 2 x 81 = 162 entries
    assert counts["executed"] == {"forwarded": 18, "sum_sq_lengths": 162, "head": 10}


def test_step_tokens_of_the_packed_layout():
    counts = flops.step_tokens(PAIRS, "packed")
    assert (counts["forwarded"], counts["sum_sq_lengths"]) == (20, 102)
    # one row of 20 tokens under a dense block-diagonal mask: 20^2 entries
    assert counts["executed"] == {"forwarded": 20, "sum_sq_lengths": 400, "head": 10}


def test_the_flop_count_of_a_step_worked_by_hand():
    counted = flops.model_flops(TINY, flops.step_tokens(PAIRS, "padded"))
    assert counted["linear"] == 6 * DECODER * 20 == 138_240
    assert counted["head"] == 6 * HEAD * 10 == 15_360
    # 6 x 2 x layers 2 x q width 8 x 102 / 2 (causal)
    assert counted["attention"] == 6 * 2 * 2 * 8 * 102 // 2 == 9_792
    assert counted["total"] == 138_240 + 15_360 + 9_792 == 163_392


def test_the_head_token_argument():
    everywhere = flops.model_flops(TINY, flops.step_tokens(PAIRS, "padded", head="all"))
    response_only = flops.model_flops(TINY, flops.step_tokens(PAIRS, "padded"))
    # every non-pad position (20) instead of the 10 response ones; nothing else changes
    assert everywhere["head"] == 6 * HEAD * 20 == 30_720
    assert everywhere["linear"] == response_only["linear"] and everywhere["attention"] == response_only["attention"]
    with pytest.raises(ValueError):
        flops.step_tokens(PAIRS, "padded", head="prompt")


def test_grouped_query_attention_shrinks_k_and_v_only():
    full = {**TINY, "num_key_value_heads": 2}  # k and v as wide as q: 8 x 8 = 64 each
    step = {"forwarded": 20, "head": 10, "sum_sq_lengths": 102}
    assert flops.parameters(full)["decoder_linear"] == 2 * (64 * 4 + 3 * 128) == DECODER + 2 * 2 * 32
    # attention FLOPs follow the query heads, which GQA keeps
    assert flops.model_flops(full, step)["attention"] == flops.model_flops(TINY, step)["attention"]
    assert flops.model_flops(full, step)["linear"] - flops.model_flops(TINY, step)["linear"] == 6 * 128 * 20


def test_head_dim_defaults_to_hidden_over_heads():
    without = {k: v for k, v in TINY.items() if k != "head_dim"}
    assert flops.dimensions(without)["head_dim"] == 4
    assert flops.parameters(without) == flops.parameters(TINY)


def test_a_tied_head_costs_the_same_flops_but_no_extra_parameters():
    untied = {**TINY, "tie_word_embeddings": False}
    step = {"forwarded": 20, "head": 10, "sum_sq_lengths": 102}
    assert flops.model_flops(untied, step)["total"] == flops.model_flops(TINY, step)["total"]
    assert flops.parameters(TINY)["matrices"] == DECODER + HEAD
    assert flops.parameters(untied)["matrices"] == DECODER + 2 * HEAD


def test_a_transformers_config_gives_the_same_count_as_its_fields():
    from transformers import LlamaConfig

    config = LlamaConfig(**TINY)
    assert flops.config_fields(config) == TINY
    step = {"forwarded": 7, "head": 3, "sum_sq_lengths": 25}
    assert flops.model_flops(config, step) == flops.model_flops(TINY, step)


def test_mfu():
    # 2 GFLOP in 0.5 s is 4 GFLOP/s, half of an 8 GFLOP/s limit
    assert flops.mfu(2e9, 0.5, 8e9) == pytest.approx(0.5, rel=1e-12)


def test_the_limit_weights_each_shape_as_a_step_does():
    seconds = {"q/o": 1.0, "k/v": 2.0, "gate/up": 3.0, "down": 4.0, "head": 5.0}  # per matmul, by shape
    calls = []

    def fake_timer(shape, matmul, run):
        calls.append((shape, matmul))
        return seconds[shape]

    limit = flops.matmul_limit(TINY, 5, torch.float32, 1, 0.0, head_tokens=3, timer=fake_timer)
    shapes = {s["name"]: s for s in limit["shapes"]}
    assert [s["name"] for s in limit["shapes"]] == ["q/o", "k/v", "gate/up", "down", "head"]
    assert len(calls) == 5 * 3
    # per step: q and o (8x8) twice a layer x 2 layers = 4; k/v (4x8) 4; gate/up (16x8) 4; down (8x16) 2; head 1
    assert {n: s["per_step"] for n, s in shapes.items()} == {"q/o": 4, "k/v": 4, "gate/up": 4, "down": 2, "head": 1}
    # FLOPs of one shape's three matmuls: 3 x 2 x rows x out x in; rows 5, the head's 3
    assert {n: s["flops"] for n, s in shapes.items()} == {"q/o": 1920, "k/v": 960, "gate/up": 3840, "down": 3840,
                                                          "head": 4608}
    # the decoder shapes add up to the linear FLOPs of a step of 5 tokens, the head to 3 head tokens
    assert 4 * 1920 + 4 * 960 + 4 * 3840 + 2 * 3840 == 6 * DECODER * 5
    assert 4608 == 6 * HEAD * 3
    # total FLOPs 7680 + 3840 + 15360 + 7680 + 4608 = 39168 over total time 4x3 + 4x6 + 4x9 + 2x12 + 1x15 = 111
    assert limit["flops_per_s"] == pytest.approx(39168 / 111, rel=1e-12)
    assert shapes["q/o"]["flops_per_s"] == pytest.approx(1920 / 3, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_limit_is_measured_in_both_dtypes(dtype):
    threads = torch.get_num_threads()
    limit = flops.matmul_limit(TINY, 16, dtype, 1, 0.01)
    assert limit["dtype"] == str(dtype).removeprefix("torch.") and limit["threads"] == 1
    assert limit["flops_per_s"] > 0 and all(s["flops_per_s"] > 0 for s in limit["shapes"])
    assert torch.get_num_threads() == threads  # restored


def test_the_memory_breakdown_of_scaling():
    scaling = load_benchmark("scaling")
    # 2^20 float32 parameters: weights 4 MiB, gradients 4 MiB, AdamW's two moments 8 MiB
    parts = scaling.memory_breakdown(2 ** 20, peak_mib=100.0, baseline_mib=50.0)
    assert parts == {"baseline_mib": 50.0, "weights_mib": 4.0, "gradients_mib": 4.0, "adamw_mib": 8.0,
                     "rest_mib": 34.0, "peak_mib": 100.0}


def test_the_untied_56m_model_of_trl_speed(tokenizer):
    trl_speed = load_benchmark("trl_speed")
    config, _ = trl_speed.model_config("llama56m-untied", tokenizer, 0, 512)
    assert (config.vocab_size, config.tie_word_embeddings) == (32000, False)
    # per layer 2 x 512 x 512 (q, o) + 2 x 128 x 512 (k, v) + 3 x 1472 x 512 = 2,916,352; x 8 layers, plus the
    # embedding and the untied head, 32000 x 512 each
    assert flops.parameters(config)["matrices"] == 8 * 2_916_352 + 2 * 32000 * 512 == 56_098_816


def test_pairs_for_a_32k_vocabulary_stay_below_it(tokenizer):
    trl_speed = load_benchmark("trl_speed")
    rows, _ = trl_speed.make_pairs(tokenizer, 8, 128, 0, vocab_limit=32000)
    assert len(rows) == 8
    assert trl_speed.describe_data(rows, tokenizer, 128, 4)["max_token_id"] < 32000
