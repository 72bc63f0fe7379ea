"""Packed and prefix-shared layouts give the padded layout's numbers: log-probs, losses and gradients."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_recipe, validated
from prefopt import engine
from prefopt.forward import layouts
from prefopt.forward.batching import collate_pairs
from prefopt.data.types import TokenizedPair
from prefopt.forward.layouts import layout_inputs
from prefopt.forward.logprobs import sequence_logps

VOCAB = 128
ATOL = 1e-5


def _model(arch: str, attn_implementation: str = "sdpa", **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    values.update(overrides)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**values)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)


def _batch():
    """Prompts of different lengths (one token to six), chosen longer or shorter than rejected."""
    pairs = [
        TokenizedPair(0, (5, 6, 7), (8, 9, 10, 2), (11, 2)),
        TokenizedPair(1, (5,), (12, 13, 2), (14, 15, 16, 17, 2)),
        TokenizedPair(2, (5, 6, 7, 8, 9, 30), (20, 2), (21, 22, 2)),
        TokenizedPair(3, (40, 41), (42, 43, 44, 45, 46, 47, 2), (48, 2)),
    ]
    return collate_pairs(pairs, range(len(pairs)), pad_id=2)


def _dpo_loss(result, reference_margins, beta=0.5):
    """A DPO loss over the batch's pairs, against fixed reference margins."""
    chosen, rejected = result.split()
    return -F.logsigmoid(beta * (chosen.sums - rejected.sums - reference_margins)).mean()


def _logps_and_grads(model, batch, layout, **kwargs):
    model.zero_grad()
    result = sequence_logps(model, batch, layout=layout, **kwargs)
    _dpo_loss(result, torch.tensor([0.3, -0.2, 0.1, 0.0])).backward()
    return result, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
@pytest.mark.parametrize("head_path,chunk_size", [(True, 3), (True, 1024), (False, 5)])
def test_layout_equals_padded(arch, attn_implementation, layout, head_path, chunk_size):
    model, batch = _model(arch, attn_implementation), _batch()
    assert layout_inputs(model, batch, layout).layout == layout  # no fallback here
    kwargs = dict(use_head_path=head_path, chunk_size=chunk_size)
    padded, padded_grads = _logps_and_grads(model, batch, "padded", **kwargs)
    got, grads = _logps_and_grads(model, batch, layout, **kwargs)
    assert got.token_logps.shape == padded.token_logps.shape == (8, batch.input_ids.shape[1] - 1)
    assert torch.equal(got.mask, padded.mask)
    torch.testing.assert_close(got.token_logps, padded.token_logps, rtol=0, atol=ATOL)
    torch.testing.assert_close(got.sums, padded.sums, rtol=0, atol=ATOL)
    assert torch.equal(got.token_counts, padded.token_counts)
    assert max(g.abs().max() for g in padded_grads.values()) > 1e-3  # the loss does reach the weights
    for name, grad in padded_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_log_collision_equals_padded(layout):
    model, batch = _model("llama"), _batch()
    with torch.no_grad():
        padded = sequence_logps(model, batch, chunk_size=3, collision=True)
        got = sequence_logps(model, batch, chunk_size=3, collision=True, layout=layout)
    torch.testing.assert_close(got.token_log_collision, padded.token_log_collision, rtol=0, atol=ATOL)


def test_prefix_shared_row_holds_prompt_chosen_rejected_with_restarting_positions():
    batch = _batch()
    inputs = layouts.prefix_shared_inputs(batch, mask_kind="bool")
    # pair 0: prompt (5, 6, 7), chosen (8, 9, 10, 2), rejected (11, 2); padded to pair 3's 2 + 7 + 2 tokens
    assert inputs.input_ids.shape == (4, 11)
    assert inputs.input_ids[0, :9].tolist() == [5, 6, 7, 8, 9, 10, 2, 11, 2]
    assert inputs.position_ids[0, :9].tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4]
    sees = inputs.attention_mask[0, 0]
    assert sees[7, :9].tolist() == [True] * 3 + [False] * 4 + [True, False]  # first rejected: prompt + itself
    assert sees[6, :9].tolist() == [True] * 7 + [False] * 2  # last chosen: prompt + chosen
    # The first rejected token (11, row 4 position 3 of the collated batch) is predicted from the last
    # prompt position (2), the second from the first rejected token (7).
    assert inputs.source[4, 2].item() == 2 and inputs.source[4, 3].item() == 7


def test_packed_row_restarts_positions_for_every_sequence():
    batch = _batch()
    inputs = layouts.packed_inputs(batch, mask_kind=None)
    lengths = batch.attention_mask.sum(-1).tolist()
    assert inputs.input_ids.shape == (1, sum(lengths))
    assert inputs.attention_mask is None
    assert inputs.position_ids[0].tolist() == [p for n in lengths for p in range(n)]


def test_sliding_window_packs_by_position_ids_and_prefix_sharing_falls_back(caplog):
    """A window shorter than the batch: packing lets transformers build each layer's mask from the position
    ids; a prefix-sharing mask would replace the window, so that layout falls back to padded, logged once."""
    model = _model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    batch = _batch()
    packed = layout_inputs(model, batch, "packed")
    assert packed.layout == "packed" and packed.attention_mask is None
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, batch, layout="packed").token_logps,
                                   sequence_logps(model, batch).token_logps, rtol=0, atol=ATOL)
    layouts._reported.clear()
    with caplog.at_level(logging.WARNING, logger="prefopt.forward.layouts"):
        assert layout_inputs(model, batch, "prefix_shared").layout == "padded"
        assert layout_inputs(model, batch, "prefix_shared").layout == "padded"
    assert len(caplog.records) == 1 and "sliding-window" in caplog.records[0].getMessage()
    wide = _model("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=1)
    assert layout_inputs(wide, batch, "prefix_shared").layout == "prefix_shared"  # the window never binds


def test_attention_without_custom_masks_falls_back_for_prefix_sharing_but_packs():
    model, batch = _model("llama"), _batch()
    model.config._attn_implementation = "flash_attention_2"  # only read here: no forward runs
    assert layout_inputs(model, batch, "prefix_shared").layout == "padded"
    packed = layout_inputs(model, batch, "packed")
    assert packed.layout == "packed" and packed.attention_mask is None  # varlen from the position ids
    model.config._attn_implementation = "my_custom_attention"
    assert layout_inputs(model, batch, "packed").layout == "padded"


def test_models_without_position_ids_fall_back():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4))
    for layout in ("packed", "prefix_shared"):
        assert "position ids" in layouts.unsupported_reason(model, layout, 16)
        assert layout_inputs(model, _batch(), layout).layout == "padded"


def test_lora_model_with_its_adapter_off_takes_the_layout():
    """The reference of a LoRA run: the PEFT-wrapped policy with its adapter disabled."""
    from peft import LoraConfig, get_peft_model

    batch = _batch()
    model = get_peft_model(_model("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert layout_inputs(model, batch, "prefix_shared").layout == "prefix_shared"
    with torch.no_grad(), model.disable_adapter():
        padded = sequence_logps(model, batch)
        shared = sequence_logps(model, batch, layout="prefix_shared")
    torch.testing.assert_close(shared.token_logps, padded.token_logps, rtol=0, atol=ATOL)


def test_auto_shares_the_prompt_where_the_model_allows_and_pads_silently_elsewhere(caplog):
    """``auto`` is prefix sharing on a model that takes it (the very same inputs), and padded, without a
    warning, on one that does not: the user asked for no particular layout."""
    batch = _batch()
    model = _model("llama")
    auto, shared = layout_inputs(model, batch, "auto"), layout_inputs(model, batch, "prefix_shared")
    assert auto.layout == "prefix_shared"
    assert torch.equal(auto.input_ids, shared.input_ids) and torch.equal(auto.attention_mask, shared.attention_mask)
    assert layouts.describe_layout(model, "auto", 16) == "prefix_shared (auto: the prompt runs once per pair)"
    narrow = _model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    layouts._reported.clear()
    with caplog.at_level(logging.WARNING, logger="prefopt.forward.layouts"):
        assert layout_inputs(narrow, batch, "auto").layout == "padded"
    assert caplog.records == []
    assert layouts.describe_layout(narrow, "auto", 16).startswith("padded (auto: Qwen2ForCausalLM its sliding-window")
    assert layouts.describe_layout(narrow, "prefix_shared", 16).startswith("padded (train.layout=prefix_shared, but")
    assert layouts.describe_layout(narrow, "packed", 16) == "packed"


def test_unknown_layout_is_an_error():
    with pytest.raises(ValueError, match="unknown layout"):
        layout_inputs(_model("llama"), _batch(), "diagonal")


def _train_losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "loss" in m]


def test_training_with_each_layout_gives_the_padded_losses(tiny_model_dir, pairs_file, tmp_path, capsys):
    losses = {}
    for layout in ("padded", "packed", "prefix_shared", None):  # None: the default, auto
        name = layout or "default"
        train = {} if layout is None else {"layout": layout}
        tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / name, train=train,
                           reference={"kind": "live"}, output={"save_model": False})
        capsys.readouterr()
        engine.train(validated(tree), show_progress=False)
        losses[name] = _train_losses(tmp_path / name)
        step_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("compute: "))
        shown = "prefix_shared (auto: the prompt runs once per pair)" if layout is None else layout
        assert step_line.startswith(f"compute: layout {shown}; fp32; gradient checkpointing off; reference live")
    assert len(losses["padded"]) == 3
    for layout in ("packed", "prefix_shared"):
        assert losses[layout] == pytest.approx(losses["padded"], abs=ATOL), layout
    assert losses["default"] == losses["prefix_shared"]  # auto runs the very same computation
