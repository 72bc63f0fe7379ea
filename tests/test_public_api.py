"""The public Python API as a user calls it: ``prefopt.__all__``, ``load_recipe``, ``train`` and its
``TrainResult``, ``Callback``, ``PrefoptError``; and the README's "From Python" example, run as written."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import prefopt
from prefopt.cli import main
from prefopt.testing import preference_file, tiny_recipe

README = Path(__file__).resolve().parents[1] / "README.md"


# ----------------------------------------------------------------------------------------------------------
# the names


def test_every_public_name_imports_from_prefopt():
    for name in prefopt.__all__:
        namespace: dict = {}
        exec(f"from prefopt import {name}", namespace)  # as a user or plugin writes it
        assert namespace[name] is getattr(prefopt, name), name
    assert sorted(set(prefopt.__all__)) == sorted(prefopt.__all__), "a name is listed twice"
    assert set(prefopt.__all__) <= set(dir(prefopt))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        prefopt.trian  # noqa: B018
    with pytest.raises(ImportError):
        exec("from prefopt import trian", {})


def test_importing_prefopt_imports_no_torch():
    code = ("import sys, prefopt; v = prefopt.__version__; e = prefopt.PrefoptError; c = prefopt.Callback; "
            "print(v, sorted(m for m in ('torch', 'transformers', 'pydantic') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [importlib.metadata.version("prefopt"), "[]"]


def test_errors_share_one_base():
    assert issubclass(prefopt.RecipeError, prefopt.PrefoptError)
    assert issubclass(prefopt.NonFiniteError, prefopt.PrefoptError)
    from prefopt.errors import PrefoptError

    assert prefopt.PrefoptError is PrefoptError  # the class the engine raises, not a copy


# ----------------------------------------------------------------------------------------------------------
# load_recipe


def test_load_recipe_from_a_dict_or_a_file_with_overrides(tmp_path):
    tree = tiny_recipe(tmp_path)
    from_dict = prefopt.load_recipe(tree, {"loss.beta": 0.3, "train.max_steps": 5})
    assert from_dict.loss.beta == 0.3 and from_dict.train.max_steps == 5
    assert tree["loss"] == {"name": "dpo"}, "the caller's dict is left as it was"

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    from_file = prefopt.load_recipe(path, ["loss.beta=0.3", "train.learning_rate=1e-4"])
    assert from_file.loss.beta == 0.3 and from_file.train.learning_rate == 1e-4  # YAML values, as on the CLI


def test_a_bad_key_raises_prefopt_error_with_the_message_the_cli_prints(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    with pytest.raises(prefopt.PrefoptError) as raised:
        prefopt.load_recipe(str(path), ["train.learning_rat=1e-5"])
    assert isinstance(raised.value, prefopt.RecipeError)
    capsys.readouterr()  # what building the tiny model printed
    assert main(["validate", str(path), "train.learning_rat=1e-5"]) == 2
    assert capsys.readouterr().err == f"prefopt: error: {raised.value}\n"
    assert "train.learning_rat: unknown key (did you mean 'learning_rate'?)" in str(raised.value)


def test_a_dict_recipe_is_named_in_its_errors_and_other_sources_are_refused(tmp_path):
    with pytest.raises(prefopt.RecipeError, match=r"^recipe: loss.bta: unknown option of loss 'dpo' \(did you mean"):
        prefopt.load_recipe(tiny_recipe(tmp_path), ["loss.bta=0.2"])
    with pytest.raises(prefopt.PrefoptError, match="give a recipe file's path or a dict"):
        prefopt.load_recipe(42)
    with pytest.raises(prefopt.PrefoptError, match="not found"):
        prefopt.load_recipe(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------------------------------------
# train, its result and callbacks


class Recorder(prefopt.Callback):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_step(self, step, metrics):
        self.calls.append(("step", step, metrics))

    def on_evaluate(self, step, metrics):
        self.calls.append(("evaluate", step, metrics))

    def on_train_end(self, result):
        self.calls.append(("end", result))


def held_out_recipe(workdir: Path, **sections) -> dict:
    """The tiny recipe reading a folder with train and test splits, so it evaluates held-out pairs."""
    data = workdir / "pairs"
    preference_file(data / "train.jsonl")
    preference_file(data / "test.jsonl")
    tree = tiny_recipe(workdir, steps=3, **sections)
    tree["data"].update(path=str(data), eval_split="test")
    return tree


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_returns_what_the_run_left_and_calls_back_for_every_record(tmp_path):
    recorder = Recorder()
    tree = held_out_recipe(tmp_path, eval={"at_start": True}, output={"save_model": True},
                           train={"eval_every": 2})
    result = prefopt.train(tree, callbacks=[recorder])

    lines = metric_lines(result.run_dir)
    assert result.run_dir == tmp_path / "run" and result.steps == 3
    training = [line for line in lines if "loss" in line]
    assert [line["step"] for line in training] == [1, 2, 3]
    assert result.final_metrics == training[-1]
    assert result.summary == json.loads((result.run_dir / "summary.json").read_text())
    assert set(result.eval_metrics) >= {"eval/loss", "eval/rewards/accuracies"}
    assert lines[0]["step"] == 0 and lines[-1]["step"] == 3
    assert result.eval_metrics == result.summary["eval_end"] == {k: v for k, v in lines[-1].items() if k != "step"}
    assert result.initial_eval_metrics == {k: v for k, v in lines[0].items() if k != "step"}
    assert result.model_path == result.run_dir / "model" and (result.model_path / "config.json").is_file()

    # every record written, in order: evaluations at steps 0, 2 (eval_every) and 3 (the end)
    written = [("evaluate" if all(k.startswith("eval/") for k in line if k != "step") else "step", line["step"],
                {k: v for k, v in line.items() if k != "step"}) for line in lines]
    assert recorder.calls[:-1] == written
    assert [(kind, step) for kind, step, _ in written] == [
        ("evaluate", 0), ("step", 1), ("step", 2), ("evaluate", 2), ("step", 3), ("evaluate", 3)]
    assert recorder.calls[-1] == ("end", result)


def test_an_exception_in_a_callback_stops_the_run_and_reaches_the_caller(tmp_path):
    class Stop(RuntimeError):
        pass

    class StopAtTwo(prefopt.Callback):
        def on_step(self, step, metrics):
            if step == 2:
                raise Stop(f"stopped at {step}")

    ended = Recorder()
    with pytest.raises(Stop, match="stopped at 2"):
        prefopt.train(tiny_recipe(tmp_path, steps=4), callbacks=[StopAtTwo(), ended])
    steps = [line["step"] for line in metric_lines(tmp_path / "run")]
    assert steps == [1, 2]  # step 2's record was written, then the run stopped: no step 3
    assert not (tmp_path / "run" / "summary.json").exists()
    assert [call[:2] for call in ended.calls] == [("step", 1)]  # the later callback never saw step 2


def test_train_takes_a_path_and_a_model_free_result_says_so(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, steps=1)))
    result = prefopt.train(path)
    assert result.steps == 1 and result.model_path is None  # tiny_recipe: output.save_model false
    assert result.eval_metrics == {} and result.initial_eval_metrics is None  # no held-out split
    assert result.final_metrics["step"] == 1 and "loss" in result.final_metrics


def test_a_rerun_of_a_finished_run_reports_its_last_training_record(tmp_path):
    """A finished run trained again takes no step; its final metrics come from metrics.jsonl."""
    tree = tiny_recipe(tmp_path, steps=2)
    first = prefopt.train(tree)
    again = prefopt.train(tree)
    assert again.steps == 2 and again.final_metrics == first.final_metrics


# ----------------------------------------------------------------------------------------------------------
# the README's example, as written


def readme_python_example() -> str:
    section = README.read_text(encoding="utf-8").split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return block


def test_the_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it builds its model and data under work/
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(readme_python_example(), "README.md (From Python)", "exec"), {"__name__": "__main__"})
    # what the example prints, among the run's own notes (data:, reference:, compute:)
    lines = [line for line in out.getvalue().splitlines() if not line.startswith(("data:", "reference:", "compute:"))]
    assert [line.split(":")[0] for line in lines[:3]] == ["step 1", "step 2", "step 3"], lines
    assert lines[3].startswith("3 steps in work/run: accuracy "), lines
    assert lines[4:] == ["recipe: loss.bta: unknown option of loss 'dpo' (did you mean 'beta'?)"]
    assert os.path.isfile("work/run/metrics.jsonl")
