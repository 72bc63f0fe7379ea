"""prefopt never deletes what it did not write: the folders it writes carry a marker, a ``model/`` without it is
refused in one line before training (not replaced after it), and checkpoint rotation deletes only marked
folders."""

from __future__ import annotations

import pytest
import yaml

from helpers import one_line_error, tiny_recipe, validated
from prefopt import engine
from prefopt.engine.markers import MARKER_NAME, is_marked

QUICK = {"epochs": 2, "max_steps": 4, "micro_batch_size": 4}  # one forward per step


def test_a_users_model_folder_stops_the_run_before_it_trains(tiny_model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    mine = out / "model" / "weights.bin"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"a week of someone's work")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, pairs_file, out, train=QUICK)))
    err = one_line_error(capsys, ["train", str(path), "--no-progress"])
    assert err == (f"prefopt: error: {out / 'model'} holds files prefopt did not write (no {MARKER_NAME} marker), "
                   "and the run would replace it with its final model; move that folder elsewhere, or set "
                   "output.save_model=false")
    assert not (out / "checkpoints").exists()
    assert mine.read_bytes() == b"a week of someone's work"


def test_save_model_refuses_a_folder_that_appeared_during_the_run(tiny_model_dir, pairs_file, tmp_path):
    from prefopt.errors import PrefoptError

    out = tmp_path / "run"
    run = engine.setup(validated(tiny_recipe(tiny_model_dir, pairs_file, out, train=QUICK)), show_progress=False)
    (out / "model").mkdir()
    (out / "model" / "notes.txt").write_text("mine")
    with pytest.raises(PrefoptError, match="holds files prefopt did not write"):
        engine.save_model(run)
    assert (out / "model" / "notes.txt").read_text() == "mine"


def test_without_save_model_the_users_folder_is_left_alone(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("mine")
    tree = tiny_recipe(tiny_model_dir, pairs_file, out, train=QUICK)
    tree["output"]["save_model"] = False
    engine.train(validated(tree), show_progress=False)
    assert (out / "model" / "notes.txt").read_text() == "mine"


def test_prefopts_own_folders_are_marked_and_its_model_is_replaced_on_a_rerun(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    engine.train(validated(tiny_recipe(tiny_model_dir, pairs_file, out, train={**QUICK, "max_steps": 2})),
                 show_progress=False)
    assert is_marked(out, "run") and is_marked(out / "model", "model")
    assert is_marked(out / "checkpoints" / "step-0000002", "checkpoint")
    first = (out / "model" / "model.safetensors").read_bytes()
    engine.train(validated(tiny_recipe(tiny_model_dir, pairs_file, out, train=QUICK)), show_progress=False)
    assert (out / "model" / "model.safetensors").read_bytes() != first  # two more steps trained into it


def test_rotation_deletes_only_the_checkpoints_prefopt_marked(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    train = {**QUICK, "save_every": 1, "keep_checkpoints": 2}
    engine.train(validated(tiny_recipe(tiny_model_dir, pairs_file, out, train={**train, "max_steps": 2})),
                 show_progress=False)
    foreign = out / "checkpoints" / "step-0000000"  # a folder of the same shape, not written by prefopt
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    engine.train(validated(tiny_recipe(tiny_model_dir, pairs_file, out, train=train)), show_progress=False)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-0000000", "step-0000003", "step-0000004"]
    assert (foreign / "notes.txt").read_text() == "mine"
