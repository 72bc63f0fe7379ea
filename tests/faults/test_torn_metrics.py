"""A torn last line of metrics.jsonl (a write a crash cut off) is dropped with a note on resume instead of
stopping it; a damaged line elsewhere stops the run in one line naming it; the file is rewritten atomically."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import metric_lines, tiny_recipe, train_losses, validated
from prefopt import engine
from prefopt.engine.records import truncate_metrics
from prefopt.errors import PrefoptError

LINES = ['{"step": 1, "loss": 0.7}', '{"step": 2, "loss": 0.6}', '{"step": 2, "before_step": true, "x": 1}',
         '{"step": 3, "loss": 0.5}']


def test_a_torn_last_line_is_dropped_with_a_note(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(LINES) + '\n{"step": 4, "lo')
    said = []
    truncate_metrics(path, 3, said.append)
    assert path.read_text() == "\n".join(LINES) + "\n"
    assert said == [f"note: the last line of {path} was cut off by an interrupted write; dropped it"]
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"], "rewritten in place, no temp left"


def test_a_torn_line_after_the_resume_step_goes_with_the_rest(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(LINES) + "\n" + '{"step": 4, "loss": 0.4, "acc')
    truncate_metrics(path, 2, lambda line: None)
    assert path.read_text() == "\n".join(LINES[:2]) + "\n"


def test_a_whole_file_is_cut_back_as_before_and_says_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    said = []
    truncate_metrics(path, 2, said.append)
    assert path.read_text() == "\n".join(LINES[:2]) + "\n" and said == []


@pytest.mark.parametrize("bad", ['{"step": 2, "lo', "[1, 2]", '{"loss": 0.1}', "\ufffd\ufffd"])
def test_a_damaged_line_before_the_end_stops_the_run_naming_it(tmp_path, bad):
    path = tmp_path / "metrics.jsonl"
    original = "\n".join([LINES[0], bad, *LINES[1:]]) + "\n"
    path.write_text(original)
    with pytest.raises(PrefoptError) as caught:
        truncate_metrics(path, 3, lambda line: None)
    assert str(caught.value) == (f"{path} line 2 is not a metrics record; repair or delete that line, then rerun")
    assert path.read_text() == original, "nothing is changed when the run stops"


def test_a_run_whose_metrics_end_in_a_torn_line_resumes_and_reads_like_one_run(tiny_model_dir, pairs_file,
                                                                             tmp_path, capsys):
    out = tmp_path / "run"
    tree = tiny_recipe(tiny_model_dir, pairs_file, out, train={"max_steps": 6, "epochs": 2, "save_every": 3},
                       output={"dir": str(out), "trackers": [], "save_model": False})
    engine.train(validated(tree), show_progress=False)
    uninterrupted = train_losses(out)
    # as a crash after step 5's line leaves it: the final checkpoint not written, half of a line appended
    shutil.rmtree(out / "checkpoints" / "step-0000006")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 5)
                                       + '{"step": 6, "loss": 0.69')

    capsys.readouterr()
    engine.train(validated(tree), show_progress=False)
    said = capsys.readouterr().out
    assert f"note: the last line of {out / 'metrics.jsonl'} was cut off by an interrupted write; dropped it" in said
    assert "resuming from" in said
    assert train_losses(out) == pytest.approx(uninterrupted, rel=0, abs=1e-6)
    steps = [m["step"] for m in metric_lines(out) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6], "each step logged once, in order"
