"""Online and iterative DPO (plugins/algorithms/online.py) on the tiny model with the transformers sampler."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from helpers import (
    kill_after, metric_lines, one_line_error, online_tree, round_records, train_losses, train_tree, validated,
)

TESTS_DIR = str(Path(__file__).parent)


def test_online_dpo_samples_judges_and_trains_each_step(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    summary = train_tree(online_tree(tiny_model_dir, pairs_file, out, {"name": "online_dpo", "rounds": 3}))
    assert summary["steps"] == 3  # one step per round by default
    rounds = round_records(out)
    assert len(rounds) == 3
    for records in rounds:
        assert len(records) == 4  # train.batch_size prompts per round
        for r in records:
            assert len(r["completions"]) == 2
            if r["chosen"] is not None:
                # the judge's pick: the longer text is chosen
                texts = [c["text"] for c in r["completions"]]
                assert len(texts[r["chosen"]]) > len(texts[r["rejected"]])
                assert r["scores"] == [float(len(t)) for t in texts]
    # every round draws other prompts until all 12 were used once
    rows = [r["row"] for records in rounds for r in records]
    assert sorted(rows) == list(range(12))
    logged = [m for m in metric_lines(out) if "round/index" in m]
    assert [m["round/index"] for m in logged] == [1.0, 2.0, 3.0]
    assert all(m["round/chosen_score"] > m["round/rejected_score"] for m in logged)


def test_iterative_reference_is_the_policy_each_round_started_from(tiny_model_dir, pairs_file, tmp_path):
    # With the reference synced to the policy at a round's start, that round's first step sees a margin of
    # exactly zero: DPO's loss is log 2. A fixed initial reference (online_dpo) does not.
    out = tmp_path / "iterative"
    algorithm = {"name": "iterative_dpo", "rounds": 3, "prompts_per_round": 8, "samples_per_prompt": 3}
    train_tree(online_tree(tiny_model_dir, pairs_file, out, algorithm))
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]  # 8 prompts / batch 4 = 2 steps per round
    for first_step in (1, 3, 5):
        assert losses[first_step] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[2] != pytest.approx(math.log(2), abs=1e-4)

    fixed = tmp_path / "fixed"
    train_tree(online_tree(tiny_model_dir, pairs_file, fixed, {**algorithm, "reference": "initial"}))
    assert train_losses(fixed)[3] != pytest.approx(math.log(2), abs=1e-4)


def test_steps_cycle_through_a_round_pairs(tiny_model_dir, pairs_file, tmp_path):
    from prefopt import engine

    out = tmp_path / "cycle"
    tree = online_tree(tiny_model_dir, pairs_file, out,
                       {"name": "online_dpo", "rounds": 1, "prompts_per_round": 6, "steps_per_round": 3})
    from prefopt_plugins.algorithms.online import OnlineDPO, RoundsPhase
    from prefopt.registry.loading import default_plugins

    algorithm = OnlineDPO(OnlineDPO.Config.model_validate({k: v for k, v in tree["algorithm"].items() if k != "name"}))
    phase = RoundsPhase(algorithm, default_plugins())
    run = engine.setup(validated({**tree, "algorithm": None, "reference": {"kind": "live"}}), phase=phase,
                       show_progress=False)
    assert run.total_steps == 3  # the phase's plan: 1 round of 3 steps
    phase.before_step(run.context, 0)
    n = len(run.train_pairs)
    plan = [phase.pairs_of_step(s) for s in range(3)]
    flat = [i for step in plan for i in step]
    assert all(len(step) == 4 for step in plan)
    # the first n picks are a permutation of the round's pairs; the rest start a new one
    assert sorted(flat[:n]) == list(range(n))
    assert plan == [phase.pairs_of_step(s) for s in range(3)]
    phase.close()


def test_resume_after_sigkill_mid_round_repeats_the_same_round(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    algorithm = {"name": "iterative_dpo", "rounds": 2, "prompts_per_round": 8}
    reference = tmp_path / "whole"
    train_tree(online_tree(tiny_model_dir, pairs_file, reference, algorithm))

    out = tmp_path / "killed"
    tree = online_tree(tiny_model_dir, pairs_file, out, algorithm)
    kill_after(tree, tmp_path / "recipe.yaml", out / "checkpoints" / "step-0000003")  # mid round 2
    assert (out / "rounds" / "round-00002.jsonl").exists()
    train_tree(tree)
    assert train_losses(out) == pytest.approx(train_losses(reference), abs=1e-6)
    assert round_records(out) == round_records(reference)
    # the resumed run's metrics read like one run: each round's line once, with the same numbers
    def round_lines(run_dir):
        return [{k: v for k, v in m.items() if k.startswith("round/") and k != "round/sample_tokens_per_s"}
                for m in metric_lines(run_dir) if m.get("before_step")]
    assert round_lines(out) == round_lines(reference)


def test_console_gives_the_rounds_schedule_not_the_data_epochs(tiny_model_dir, pairs_file, tmp_path, capsys):
    # 12 pairs in batches of 5 leave 2 out of an offline epoch; an online run never trains that schedule,
    # so it says nothing of it, and a resumed run counts its steps against the rounds' total.
    out = tmp_path / "run"
    algorithm = {"name": "online_dpo", "rounds": 2}
    train_tree(online_tree(tiny_model_dir, pairs_file, out, algorithm, train={"batch_size": 5, "micro_batch_size": 5}))
    printed = capsys.readouterr().out
    assert "each epoch uses" not in printed
    assert "online_dpo: 2 rounds of 5 prompts x 2 samples, 1 steps each (2 steps)" in printed
    train_tree(online_tree(tiny_model_dir, pairs_file, out, {**algorithm, "rounds": 3}, train={"batch_size": 5, "micro_batch_size": 5}))
    printed = capsys.readouterr().out
    assert "(step 2)" in printed and "(step 2 of" not in printed
    assert "(3 steps, resuming after step 2)" in printed


def test_online_checks_name_the_recipe_key(tiny_model_dir, pairs_file, tmp_path, capsys):
    import yaml

    def error(algorithm, **sections) -> str:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(online_tree(tiny_model_dir, pairs_file, tmp_path / "o", algorithm, **sections)))
        return one_line_error(capsys, ["validate", str(path)])

    assert "loss.name=rdpo" in error({"name": "ilr_dpo", "rounds": 1})
    assert "reference.kind" in error({"name": "online_dpo", "rounds": 1}, reference={"kind": "cache"})
    message = error({"name": "online_dpo", "rounds": 1, "sampler": {"name": "transformers", "temperature": -1}})
    assert "algorithm.sampler.temperature" in message
    assert "unknown sampler 'vlm'" in error({"name": "online_dpo", "rounds": 1, "sampler": {"name": "vlm"}})


def test_all_ties_stop_with_a_clear_error(tiny_model_dir, pairs_file, tmp_path):
    from prefopt.errors import PrefoptError

    tree = online_tree(tiny_model_dir, pairs_file, tmp_path / "ties", {
        "name": "online_dpo", "rounds": 1,
        "judge": {"name": "function", "function": "helpers:text_length_reward", "min_margin": 1e9},
    })
    with pytest.raises(PrefoptError, match="round 1: the judge tied every prompt"):
        train_tree(tree)
