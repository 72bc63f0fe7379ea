"""What a user sees when a recipe or its data is wrong: one line, naming what and where, exit 2."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import one_line_error
from prefopt.cli import main


@pytest.fixture()
def recipe_file(tmp_path, tiny_model_dir, pairs_file):
    def write(**data_overrides) -> str:
        tree = {
            "model": {"path": str(tiny_model_dir)},
            "data": {"path": str(pairs_file), "max_length": 32, "max_prompt_length": None, **data_overrides},
            "loss": {"name": "dpo", "beta": 0.1},
            "train": {"max_steps": 1, "batch_size": 4},
            "output": {"dir": str(tmp_path / "run"), "trackers": []},
        }
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(tree))
        return str(path)

    return write


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_unknown_key_names_its_path_and_the_closest_key(capsys, recipe_file):
    err = one_line_error(capsys, ["validate", recipe_file(), "train.learning_rat=1e-5"])
    assert "train.learning_rat: unknown key (did you mean 'learning_rate'?)" in err


def test_bad_type_names_the_key_and_the_value(capsys, recipe_file):
    err = one_line_error(capsys, ["validate", recipe_file(), "train.batch_size=eight"])
    assert "train.batch_size" in err and "'eight'" in err


def test_unknown_loss_name_suggests_the_closest(capsys, recipe_file):
    err = one_line_error(capsys, ["train", recipe_file(), "loss.name=dpoo"])
    assert "loss.name: unknown loss 'dpoo' (did you mean 'dpo'" in err


def test_missing_column_names_the_file_the_column_and_the_fix(capsys, recipe_file, tmp_path):
    data = _write_jsonl(tmp_path / "renamed.jsonl", [{"prompt": "a", "good": "b", "rejected": "c"}] * 4)
    err = one_line_error(capsys, ["train", recipe_file(path=data), "--no-progress"])
    assert "renamed.jsonl" in err and "'chosen'" in err and "data.columns.chosen" in err


def test_empty_file_is_named(capsys, recipe_file, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = one_line_error(capsys, ["train", recipe_file(path=str(empty)), "--no-progress"])
    assert "empty.jsonl" in err and "empty" in err


def test_prompt_longer_than_max_length_names_the_row_and_the_fixes(capsys, recipe_file, tmp_path):
    rows = [{"prompt": "fine", "chosen": " yes", "rejected": " no"}] * 3
    rows.insert(2, {"prompt": "word " * 100, "chosen": " yes", "rejected": " no"})
    data = _write_jsonl(tmp_path / "long.jsonl", rows)
    err = one_line_error(capsys, ["train", recipe_file(path=data), "--no-progress"])
    assert "long.jsonl" in err and "row 2" in err and "max_length" in err and "invalid_rows=skip" in err


def test_several_recipe_problems_are_reported_together(capsys, recipe_file):
    assert main(["validate", recipe_file(), "loss.beta=-1", "train.epochs=0", "model.dtpye=float32"]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err
    assert "loss.beta" in err and "train.epochs" in err and "model.dtpye" in err


def test_validate_accepts_a_good_recipe(capsys, recipe_file):
    assert main(["validate", recipe_file()]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")
