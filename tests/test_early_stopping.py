"""Early stopping (``eval.early_stopping``): a run whose metric stops improving ends like a finished run, and a
resumed run stops at the step the uninterrupted one did, with the same state and the same ``num_tokens``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import prefopt
from helpers import one_line_error, tiny_recipe, validated
from prefopt.cli import main
from prefopt.engine.early_stopping import EarlyStopping
from prefopt.errors import PrefoptError, RecipeError

# One forward per step (micro_batch_size = batch_size); an evaluation and a checkpoint after every step.
TRAIN = {"epochs": 2, "max_steps": 6, "micro_batch_size": 4, "eval_every": 1, "save_every": 1, "keep_checkpoints": 10}
# eval/loss moves by far less than 1 in a few steps: the first evaluation is the best, and after `patience`
# more the run stops (patience 3: at step 4 of 6)
STOPPING = {"metric": "eval/loss", "mode": "min", "patience": 3, "min_delta": 1.0}


def tree(model_dir: Path, data_dir: Path, out: Path, **train) -> dict:
    return tiny_recipe(model_dir, data_dir, out, data={"eval_split": "test"}, train={**TRAIN, **train},
                       eval={"at_start": False, "task_metrics": False, "early_stopping": STOPPING})


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_same_records(one: list[dict], other: list[dict]) -> None:
    assert [sorted(r) for r in one] == [sorted(r) for r in other]
    for a, b in zip(one, other):
        for key, value in a.items():
            if key in ("tokens_per_s", "pairs_per_s"):
                continue  # timings
            # the same steps from the same checkpointed weights and random state: equal to float rounding
            assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (a["step"], key)


# --- the rule


def test_an_evaluation_counts_when_it_does_not_beat_the_best_by_more_than_min_delta():
    stopper = EarlyStopping("eval/loss", "min", patience=2, min_delta=0.1)
    assert not stopper.check(1, {"eval/loss": 1.0})
    assert not stopper.check(2, {"eval/loss": 0.95})  # better, but by less than min_delta
    assert (stopper.best, stopper.best_step, stopper.without_improvement) == (1.0, 1, 1)
    assert not stopper.check(3, {"eval/loss": 0.8})  # better by more: the new best, the count starts again
    assert (stopper.best, stopper.best_step, stopper.without_improvement) == (0.8, 3, 0)
    assert not stopper.check(4, {"eval/loss": math.nan})
    assert stopper.check(5, {"eval/loss": 0.75})
    assert stopper.record(5) == {"step": 5, "metric": "eval/loss", "best": 0.8, "best_step": 3}


def test_max_mode_wants_higher_values_and_a_nan_never_becomes_the_best():
    stopper = EarlyStopping("eval/rewards/accuracies", "max", patience=1, min_delta=0.0)
    assert stopper.check(1, {"eval/rewards/accuracies": math.nan})  # no improvement: patience 1 is spent
    assert stopper.best is None and stopper.without_improvement == 1
    stopper = EarlyStopping("eval/rewards/accuracies", "max", patience=1, min_delta=0.0)
    assert not stopper.check(1, {"eval/rewards/accuracies": 0.5})
    assert not stopper.check(2, {"eval/rewards/accuracies": 0.75})
    assert stopper.check(3, {"eval/rewards/accuracies": 0.75})  # equal is no improvement


def test_state_comes_back_whole_unless_the_metric_changed():
    stopper = EarlyStopping("eval/loss", "min", 3, 0.0)
    stopper.check(2, {"eval/loss": 0.5})
    stopper.check(4, {"eval/loss": 0.6})
    state = json.loads(json.dumps(stopper.state_dict()))  # as state.json keeps it
    again = EarlyStopping("eval/loss", "min", 5, 0.0)
    again.load_state_dict(state, say=lambda line: None)
    assert (again.best, again.best_step, again.without_improvement, again.last_checked) == (0.5, 2, 1, 4)
    notes = []
    other = EarlyStopping("eval/ood/loss", "min", 3, 0.0)
    other.load_state_dict(state, say=notes.append)
    assert other.best is None and other.without_improvement == 0 and "counting eval/ood/loss" in notes[0]


def test_an_unknown_metric_names_the_keys_there_are():
    stopper = EarlyStopping("eval/los", "min", 3, 0.0)
    with pytest.raises(PrefoptError, match=r"^eval\.early_stopping\.metric: 'eval/los' is not logged at "
                                           r"evaluations \(did you mean 'eval/loss'\?\); the keys logged are "
                                           r"eval/loss, loss$"):
        stopper.check(1, {"eval/loss": 1.0, "loss": 1.0})


@pytest.mark.parametrize("change, fix", [({"train": {"eval_every": None}}, "set train.eval_every"),
                                         ({"data": {"eval_split": None}}, "set data.eval_split or add an eval set")])
def test_early_stopping_without_evaluations_is_a_recipe_error(tiny_model_dir, pairs_dir, tmp_path, change, fix):
    broken = tree(tiny_model_dir, pairs_dir, tmp_path / "run")
    for section, values in change.items():
        broken[section] = {**broken[section], **values}
    with pytest.raises(RecipeError, match=fix) as error:
        validated(broken)
    assert len(str(error.value).splitlines()) == 1 and "eval.early_stopping" in str(error.value)


# --- runs


def test_a_run_that_stops_early_finishes_like_a_finished_run_and_stays_stopped(
        tiny_model_dir, pairs_dir, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree(tiny_model_dir, pairs_dir, tmp_path / "run")))
    assert main(["train", str(recipe), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "early stopping at step 4: eval/loss has not improved by more than 1 in 3 evaluations" in out

    run = tmp_path / "run"
    done = summary(run)
    first_loss = next(r["eval/loss"] for r in lines(run) if r["step"] == 1 and "eval/loss" in r)
    assert done["stopped_early"] == {"step": 4, "metric": "eval/loss", "best": first_loss, "best_step": 1}
    assert done["steps"] == 4 and done["eval_end"]["eval/loss"] > first_loss - 1.0
    assert (run / "model" / "model.safetensors").is_file() and (run / "checkpoints" / "step-0000004").is_dir()
    records = lines(run)
    assert max(r["step"] for r in records) == 4
    assert [r["step"] for r in records if "eval/loss" in r] == [1, 2, 3, 4]  # step 4's once: finish's
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]

    # run again: the patience is spent, so it trains nothing and finishes again at the same step
    assert main(["train", str(recipe), "--no-progress"]) == 0
    assert "early stopping at step 4" in capsys.readouterr().out
    assert summary(run)["stopped_early"] == done["stopped_early"] and summary(run)["steps"] == 4
    assert [r["step"] for r in lines(run) if "loss" in r] == [1, 2, 3, 4]


def test_a_resumed_run_stops_at_the_step_of_the_uninterrupted_one(tiny_model_dir, pairs_dir, tmp_path):
    prefopt.train(tree(tiny_model_dir, pairs_dir, tmp_path / "whole"))

    class CrashAtThree(prefopt.Callback):
        def on_step(self, step, metrics):
            if step == 3:  # after step 3 trained, before its evaluation and checkpoint: step 2's is the newest
                raise RuntimeError("crash")

    interrupted = tree(tiny_model_dir, pairs_dir, tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="crash"):
        prefopt.train(interrupted, callbacks=[CrashAtThree()])
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["counters"]["early_stopping"]["without_improvement"] == 1
    prefopt.train(interrupted)

    whole, resumed = summary(tmp_path / "whole"), summary(tmp_path / "resumed")
    assert resumed["stopped_early"] == whole["stopped_early"] and whole["stopped_early"]["step"] == 4
    assert_same_records(lines(tmp_path / "whole"), lines(tmp_path / "resumed"))
    tokens = [r["num_tokens"] for r in lines(tmp_path / "whole") if "num_tokens" in r]
    assert tokens == sorted(tokens) and len(set(tokens)) == 4  # cumulative: every step adds its tokens


def test_a_finished_run_continued_checks_its_last_evaluation_as_the_uninterrupted_run_did(
        tiny_model_dir, pairs_dir, tmp_path):
    """A run to max_steps 2 ends with finish's evaluation, which no check saw; continued to max_steps 6 it
    checks that evaluation first, so it stops at step 4 as a run to 6 from the start does."""
    prefopt.train(tree(tiny_model_dir, pairs_dir, tmp_path / "whole"))
    prefopt.train(tree(tiny_model_dir, pairs_dir, tmp_path / "continued", max_steps=2))
    prefopt.train(tree(tiny_model_dir, pairs_dir, tmp_path / "continued"))
    assert summary(tmp_path / "continued")["stopped_early"] == summary(tmp_path / "whole")["stopped_early"]


@pytest.mark.parametrize("at_start", [True, False])
def test_a_misspelt_metric_is_one_line_at_the_first_evaluation(tiny_model_dir, pairs_dir, tmp_path, capsys,
                                                               at_start):
    bad = tree(tiny_model_dir, pairs_dir, tmp_path / "run")
    bad["eval"] = {**bad["eval"], "at_start": at_start, "early_stopping": {**STOPPING, "metric": "eval/rewards/acc"}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(bad))
    err = one_line_error(capsys, ["train", str(recipe), "--no-progress"])
    assert "eval.early_stopping.metric: 'eval/rewards/acc' is not logged" in err
    assert "did you mean 'eval/rewards/accuracies'" in err and "eval/loss" in err
    trained = [r["step"] for r in lines(tmp_path / "run") if "loss" in r]
    assert trained == ([] if at_start else [1])  # the baseline finds it before the first step
