"""A run resumes only under the recipe it was started with: a change of anything that changes its numbers stops
the rerun in one line listing the changed keys (recipe.yaml untouched), keys that only say how long, what to
evaluate, how often or where may change, and ``--allow-changed`` / ``train.allow_changed`` lets any other key
change on purpose. ``--resume-from`` continues a named checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import PAIRS, write_jsonl
from helpers import one_line_error, tiny_recipe, train_losses, validated
from prefopt import engine
from prefopt.cli import main
from prefopt.errors import PrefoptError

QUICK = {"epochs": 2, "micro_batch_size": 4, "save_every": 2}  # one forward per step


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A run stopped after step 2, to rerun with changes, and the losses of 6 uninterrupted steps."""
    root = tmp_path_factory.mktemp("guarded-runs")
    data = write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])

    def tree(out: Path, **train) -> dict:
        return tiny_recipe(tiny_model_dir, data, out, train={**QUICK, "max_steps": 6, **train})

    engine.train(validated(tree(root / "whole")), show_progress=False)
    engine.train(validated(tree(root / "two", max_steps=2)), show_progress=False)
    return {"tree": tree, "two": root / "two", "data": data, "losses": train_losses(root / "whole")}


@pytest.fixture()
def two(runs, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(runs["two"], copy)
    return copy


def recipe_file(tree: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_a_changed_loss_option_stops_the_rerun_and_keeps_the_saved_recipe(runs, two, tmp_path, capsys):
    saved = (two / "recipe.yaml").read_text()
    path = recipe_file(runs["tree"](two), tmp_path / "recipe.yaml")
    err = one_line_error(capsys, ["train", path, "loss.beta=0.2", "train.learning_rate=0.01", "--no-progress"])
    assert (f"checkpoint {two / 'checkpoints' / 'step-0000002'} was trained under another recipe: loss.beta is 0.1 "
            "there, 0.2 now; train.learning_rate is 0.001 there, 0.01 now;") in err
    assert "choose a new output.dir, or allow the change with --allow-changed loss.beta,train.learning_rate" in err
    assert (two / "recipe.yaml").read_text() == saved
    assert list(train_losses(two)) == [1, 2]


def test_other_data_or_a_new_section_is_a_change(runs, two, tmp_path, capsys):
    other = tmp_path / "other.jsonl"
    shutil.copy(runs["data"], other)
    path = recipe_file(runs["tree"](two), tmp_path / "recipe.yaml")
    err = one_line_error(capsys, ["train", path, f"data.path={other}", "model.lora={r: 4}", "--no-progress"])
    assert f"data.path is {str(runs['data'])!r} there, {str(other)!r} now" in err
    assert "model.lora is None there, set now" in err


def test_safe_keys_change_freely_and_the_run_continues_exactly(runs, two, capsys):
    tree = runs["tree"](two, save_every=3, keep_checkpoints=4)  # and max_steps 2 -> 6
    tree["eval"] = {"at_start": True, "task_metrics": False}
    tree["output"]["trackers"] = ["tensorboard"]
    engine.train(validated(tree), show_progress=False)
    assert "resuming from" in capsys.readouterr().out
    resumed = train_losses(two)
    for step, loss in runs["losses"].items():
        assert resumed[step] == pytest.approx(loss, rel=0, abs=1e-6), step


def test_allow_changed_lets_a_change_through_with_a_note(runs, two, tmp_path, capsys):
    path = recipe_file(runs["tree"](two), tmp_path / "recipe.yaml")
    assert main(["train", path, "train.learning_rate=0.002", "--allow-changed", "train.learning_rate",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (f"note: resuming {two / 'checkpoints' / 'step-0000002'} under a changed recipe, as train.allow_changed "
            "allows: train.learning_rate is 0.001 there, 0.002 now") in out
    assert yaml.safe_load((two / "recipe.yaml").read_text())["train"]["learning_rate"] == 0.002
    # the recipe key does the same, and a whole section may be named
    tree = runs["tree"](two, max_steps=6, learning_rate=0.003, allow_changed=["train"])
    engine.train(validated(tree), show_progress=False)


def test_allow_changed_must_name_a_key_of_the_recipe(runs, two, tmp_path, capsys):
    path = recipe_file(runs["tree"](two), tmp_path / "recipe.yaml")
    err = one_line_error(capsys, ["train", path, "--allow-changed", "train.learning_rat", "--no-progress"])
    assert "train.allow_changed: 'train.learning_rat' is no key or section of the recipe (did you mean " \
           "'train.learning_rate'" in err


def test_resume_from_continues_a_named_checkpoint_in_a_new_output_dir(runs, two, tmp_path, capsys):
    checkpoint = two / "checkpoints" / "step-0000002"
    out = tmp_path / "elsewhere"
    path = recipe_file(runs["tree"](out), tmp_path / "recipe.yaml")
    assert main(["train", path, "--resume-from", str(checkpoint), "--no-progress"]) == 0
    assert f"resuming from {checkpoint} (step 2 of 6)" in capsys.readouterr().out
    resumed = train_losses(out)
    assert list(resumed) == [3, 4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(runs["losses"][step], rel=0, abs=1e-6), step
    # a recipe changed against that checkpoint is refused there too
    err = one_line_error(capsys, ["train", path, "loss.beta=0.3", f"output.dir={tmp_path / 'third'}",
                                  "--resume-from", str(checkpoint), "--no-progress"])
    assert "loss.beta is 0.1 there, 0.3 now" in err


@pytest.mark.parametrize("named, expected", [
    ("checkpoints/step-0000002", "holds checkpoints at or after its step 2 (step-0000004), which the resumed run "
                                 "would replace; choose a new output.dir"),
    ("recipe.yaml", "not a checkpoint folder (no state.json)"),
])
def test_resume_from_refuses_what_it_cannot_resume(runs, two, tmp_path, capsys, named, expected):
    later = two / "checkpoints" / "step-0000004"
    shutil.copytree(two / "checkpoints" / "step-0000002", later)  # as if the run had gone on
    path = recipe_file(runs["tree"](two), tmp_path / "recipe.yaml")
    err = one_line_error(capsys, ["train", path, "--resume-from", str(two / named), "--no-progress"])
    assert expected in err


def test_a_checkpoint_from_before_this_guard_is_compared_with_the_runs_recipe(runs, two, tmp_path, capsys):
    """An older prefopt kept the recipe only in the run directory, and no manifest."""
    checkpoint = two / "checkpoints" / "step-0000002"
    for name in ("recipe.yaml", "MANIFEST.json", ".prefopt"):
        (checkpoint / name).unlink()
    path = recipe_file(runs["tree"](two), tmp_path / "recipe.yaml")
    err = one_line_error(capsys, ["train", path, "loss.beta=0.2", "--no-progress"])
    assert "loss.beta is 0.1 there, 0.2 now" in err


def test_an_algorithm_recipe_takes_no_resume_from(runs, tmp_path):
    tree = runs["tree"](tmp_path / "run")
    tree["algorithm"] = {"name": "stepwise", "stages": 2}
    with pytest.raises(PrefoptError, match="--resume-from: this recipe runs algorithm 'stepwise'"):
        engine.run(validated(tree), show_progress=False, resume_from=tmp_path)
