"""sDPO through the stepwise algorithm plugin: stage references, the partition, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import PAIRS, write_jsonl
from helpers import kill_after, tiny_recipe, train_losses, validated
from prefopt import engine
from prefopt.errors import RecipeError
from prefopt.models.loading import base_weights_fingerprint

TRAIN = {"batch_size": 2, "micro_batch_size": 1, "max_steps": None, "epochs": 1, "learning_rate": 3e-3,
         "save_every": 2}


def _stepwise(tiny_model_dir, data, out, algorithm=None, **sections):
    algorithm = algorithm or {"name": "stepwise", "stages": 2, "split": "random"}
    sections.setdefault("train", TRAIN)
    return tiny_recipe(tiny_model_dir, data, out, algorithm=algorithm, **sections)


def test_two_stages_each_pair_once_and_stage_two_is_held_to_stage_ones_final_weights(
    tiny_model_dir, pairs_file, tmp_path
):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    summary = engine.run(validated(_stepwise(tiny_model_dir, pairs_file, out)), show_progress=False)
    plan = json.loads((out / "stages.json").read_text())
    stage_pairs = [stage["pairs"] for stage in plan["stages"]]
    assert sorted(stage_pairs[0] + stage_pairs[1]) == list(range(len(PAIRS)))  # a partition of the data

    # Within each stage the engine's plan uses every pair of the stage exactly once in the epoch.
    used = []
    for pairs in stage_pairs:
        steps = len(pairs) // TRAIN["batch_size"]
        for step in range(steps):
            used += [pairs[i] for i in engine.planned_pairs(0, len(pairs), TRAIN["batch_size"], step)]
    assert sorted(used) == list(range(len(PAIRS)))
    assert summary["steps"] == len(PAIRS) // TRAIN["batch_size"]

    # Stage 1's final weights, as trained (its last checkpoint), are bitwise stage 2's reference.
    stage1 = out / "stages" / "stage-1"
    final = load_file(str(stage1 / "checkpoints" / "step-0000003" / "trainable.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.load_state_dict(final, strict=False)
    stage2_reference = summary["stages"][1]["reference"]
    assert stage2_reference["weights"] == base_weights_fingerprint(model)
    assert summary["stages"][0]["reference"]["weights"] != stage2_reference["weights"]
    # and the final model is stage 2's
    final_model = AutoModelForCausalLM.from_pretrained(out / "model")
    stage2_model = AutoModelForCausalLM.from_pretrained(out / "stages" / "stage-2" / "model")
    for (name, a), (_, b) in zip(final_model.state_dict().items(), stage2_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_column_split_follows_the_given_order(tiny_model_dir, tmp_path):
    rows = [{"prompt": p, "chosen": c, "rejected": r, "source": "b" if i % 3 else "a"}
            for i, (p, c, r) in enumerate(PAIRS)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    algorithm = {"name": "stepwise", "split": "column", "column": "source", "order": ["b", "a"]}
    engine.run(validated(_stepwise(tiny_model_dir, data, tmp_path / "run", algorithm,
                                   train={**TRAIN, "max_steps": 1})), show_progress=False)
    plan = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert [s["value"] for s in plan["stages"]] == ["b", "a"]
    assert plan["stages"][1]["pairs"] == [0, 3, 6, 9]


def test_score_split_puts_the_pairs_the_model_already_prefers_first(tiny_model_dir, pairs_file, tmp_path):
    algorithm = {"name": "stepwise", "stages": 3, "split": "score"}
    engine.run(validated(_stepwise(tiny_model_dir, pairs_file, tmp_path / "run", algorithm,
                                   train={**TRAIN, "max_steps": 1})), show_progress=False)
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())["stages"]
    margins = [s["mean_margin"] for s in stages]
    assert margins == sorted(margins, reverse=True) and margins[0] > margins[-1]
    assert [len(s["pairs"]) for s in stages] == [4, 4, 4]


def test_lora_stages_merge_and_the_final_model_loads(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    tree = _stepwise(tiny_model_dir, pairs_file, tmp_path / "run",
                     model={"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}},
                     train={**TRAIN, "learning_rate": 1e-2, "max_steps": 2})
    summary = engine.run(validated(tree), show_progress=False)
    assert [s["reference"]["source"] for s in summary["stages"]] == ["policy with its LoRA adapter disabled"] * 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert not any("lora" in name for name in model.state_dict())


def test_resume_after_sigkill_in_stage_two_continues_mid_stage(tiny_model_dir, pairs_file, tmp_path):
    full = _stepwise(tiny_model_dir, pairs_file, tmp_path / "full")
    engine.run(validated(full), show_progress=False)
    killed = _stepwise(tiny_model_dir, pairs_file, tmp_path / "killed")
    kill_after(killed, tmp_path / "killed.yaml",
               tmp_path / "killed" / "stages" / "stage-2" / "checkpoints" / "step-0000002")
    assert not (tmp_path / "killed" / "stages" / "stage-2" / "summary.json").exists()
    engine.run(validated(killed), show_progress=False)
    for stage in ("stage-1", "stage-2"):
        expected = train_losses(tmp_path / "full" / "stages" / stage)
        resumed = train_losses(tmp_path / "killed" / "stages" / stage)
        assert list(resumed) == [1, 2, 3]
        for step, value in expected.items():
            assert resumed[step] == pytest.approx(value, rel=0, abs=1e-6), (stage, step)


@pytest.mark.parametrize("algorithm,sections,message", [
    ({"name": "stepwise", "split": "random"}, {}, "algorithm.stages is required"),
    ({"name": "stepwise", "stages": 2, "column": "x"}, {}, "are for split column"),
    ({"name": "stepwise", "stages": 2}, {"reference": {"path": "elsewhere"}}, "remove reference.path"),
    ({"name": "stepwise", "stages": 2, "splitt": "random"}, {}, "did you mean 'split'"),
])
def test_recipe_errors(tiny_model_dir, pairs_file, tmp_path, algorithm, sections, message):
    with pytest.raises(RecipeError, match=message):
        validated(_stepwise(tiny_model_dir, pairs_file, tmp_path / "run", algorithm, **sections))


def test_engine_train_refuses_a_recipe_with_an_algorithm(tiny_model_dir, pairs_file, tmp_path):
    from prefopt.errors import PrefoptError

    with pytest.raises(PrefoptError, match="use prefopt.engine.run") as caught:
        engine.train(validated(_stepwise(tiny_model_dir, pairs_file, tmp_path / "run")), show_progress=False)
    # and an algorithm's own runs are told how to derive a recipe without the section, not to call run again
    assert "prefopt.derive_recipe(recipe, plugins, {'algorithm': None}, source)" in str(caught.value)
    assert "\n" not in str(caught.value)
