"""SAPO (plugins/algorithms/sapo.py) through the engine on the tiny model: the EMA and the reference refresh
checked against the checkpoints' own weights, the buffer's pairs built from the real responses, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import PAIRS, write_jsonl
from helpers import kill_after, one_line_error, tiny_recipe, train_losses, validated

TESTS_DIR = str(Path(__file__).parent)


def sapo_tree(model_dir, data, out, data_options=None, **algorithm):
    spec = {"name": "sapo", "segment_tokens": 4, "ema_decay": 0.5, "reference_refresh_every": 2,
            "sampler": {"name": "transformers", "temperature": 0.7, "top_p": 0.95, "top_k": 50}, **algorithm}
    return tiny_recipe(model_dir, data, out, algorithm=spec, data=data_options or {},
                       train={"epochs": 2, "max_steps": 4, "save_every": 1, "keep_checkpoints": 100})


def _run(tree):
    from prefopt import engine

    return engine.run(validated(tree), show_progress=False)


def _checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:07d}"


def test_ema_and_reference_refresh_follow_the_official_order(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "sapo"
    _run(sapo_tree(tiny_model_dir, pairs_file, out))
    initial = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    policy = {0: {k: initial[k] for k in load_file(str(_checkpoint(out, 1) / "trainable.safetensors"))}}
    ema, reference = {0: policy[0]}, {}
    for step in range(1, 5):
        policy[step] = load_file(str(_checkpoint(out, step) / "trainable.safetensors"))
        ema[step] = load_file(str(_checkpoint(out, step) / "ema.safetensors"))
        reference[step] = load_file(str(_checkpoint(out, step) / "reference.safetensors"))
    for step in range(1, 5):
        # step `step` (1-based) began with ema <- 0.5 * ema + 0.5 * the policy after step - 1
        for name, value in ema[step].items():
            expected = 0.5 * ema[step - 1][name] + 0.5 * policy[step - 1][name]
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    # the reference takes the EMA weights at 0-based steps 0 and 2, i.e. at the start of steps 1 and 3
    for name in ema[1]:
        torch.testing.assert_close(reference[1][name], ema[1][name], rtol=0, atol=0)
        torch.testing.assert_close(reference[2][name], ema[1][name], rtol=0, atol=0)
        torch.testing.assert_close(reference[3][name], ema[3][name], rtol=0, atol=0)
        torch.testing.assert_close(reference[4][name], ema[3][name], rtol=0, atol=0)
    assert any(not torch.equal(ema[4][n], ema[3][n]) for n in ema[4])


def test_buffer_pairs_rewrite_a_segment_of_the_real_response(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "sapo"
    _run(sapo_tree(tiny_model_dir, pairs_file, out))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["sapo/buffer_size"] for m in metrics if "sapo/buffer_size" in m] == [4.0, 8.0, 12.0, 16.0]
    state = json.loads((_checkpoint(out, 4) / "state.json").read_text())["extra"]["buffer"]
    items = state["items"]
    assert len(items) == 16
    # each step draws train.batch_size = 4 pairs, distinct within a step: 16 draws in all
    assert sum(item["times_sampled"] for item in items) == 16
    for item in items:
        chosen, rejected = item["chosen_ids"], item["rejected_ids"]
        # A = chosen[:t] is kept: the two share a prefix, and whatever follows the rewritten segment (C) is
        # the real response's tail, unless the generated segment ended with EOS
        assert chosen[-1] == 2 or rejected[-1] in (2, chosen[-1])
        shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        assert shared <= max(0, len(chosen) - 3 - min(4, len(chosen))) + 4


def test_orpo_base_loss_needs_no_reference(tiny_model_dir, pairs_file, tmp_path):
    tree = sapo_tree(tiny_model_dir, pairs_file, tmp_path / "orpo")
    tree["loss"] = {"name": "orpo", "beta": 0.05}
    summary = _run(tree)
    assert summary["reference"] is None
    assert not (_checkpoint(tmp_path / "orpo", 4) / "reference.safetensors").exists()
    assert (_checkpoint(tmp_path / "orpo", 4) / "ema.safetensors").exists()


def test_resume_after_sigkill_continues_with_the_same_buffer_and_ema(tiny_model_dir, pairs_file, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    whole = tmp_path / "whole"
    _run(sapo_tree(tiny_model_dir, pairs_file, whole))
    out = tmp_path / "killed"
    tree = sapo_tree(tiny_model_dir, pairs_file, out)
    kill_after(tree, tmp_path / "recipe.yaml", _checkpoint(out, 2))
    _run(tree)
    assert train_losses(out) == pytest.approx(train_losses(whole), abs=1e-6)
    final = json.loads((_checkpoint(out, 4) / "state.json").read_text())["extra"]
    assert final == json.loads((_checkpoint(whole, 4) / "state.json").read_text())["extra"]
    for name, value in load_file(str(_checkpoint(out, 4) / "ema.safetensors")).items():
        torch.testing.assert_close(value, load_file(str(_checkpoint(whole, 4) / "ema.safetensors"))[name],
                                   rtol=0, atol=1e-6)


def test_prompt_only_data_is_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    # SAPO rewrites the chosen responses, which prompt-only rows do not have
    from prefopt.errors import PrefoptError

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p, _, _ in PAIRS])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(sapo_tree(tiny_model_dir, prompts, tmp_path / "named",
                                           data_options={"format": "prompt_only"})))
    message = one_line_error(capsys, ["validate", str(recipe)])
    # the shared refusal of every algorithm that does not declare pairs_from_prompts
    assert "algorithm 'sapo'" in message and "data.format=prompt_only" in message
    # detected by data.format=auto: refused when the data is read, before anything trains
    out = tmp_path / "detected"
    with pytest.raises(PrefoptError) as caught:
        _run(sapo_tree(tiny_model_dir, prompts, out))
    assert "\n" not in str(caught.value)
    assert f"{prompts} (split train)" in str(caught.value) and "data.format=auto" in str(caught.value)
    assert not (out / "checkpoints").exists()
