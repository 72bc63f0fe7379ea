"""eval.samples: completions of held-out prompts sampled while training, in samples.jsonl and the trackers.

Runs train the tiny model for 4 steps, sampling at steps 0, 2 and 4 (eval_every 2): the lines, their scores
(a judge, a task's own score), a resume that samples again exactly what the uninterrupted run sampled, and the
table each tracker gets (TensorBoard's text, an MLflow table artifact) read back with the tracker's own reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import Field

from helpers import metric_lines, one_line_error, train_losses, validated
from prefopt import Task, TaskConfig, TaskData, hookimpl
from prefopt import engine
from prefopt.engine import samples as samples_module
from prefopt.engine.trackers import markdown_table
from prefopt.errors import PrefoptError
from prefopt.registry.loading import default_plugins, load_plugins
from prefopt.testing import PAIRS, preference_file, tiny_recipe, write_recipe

MAX_NEW_TOKENS = 6
JUDGE = {"name": "function", "function": "helpers:text_length_reward"}  # the score is len(completion)


def samples_tree(tmp_path: Path, samples: dict | None = None, steps: int = 4, **sections) -> dict:
    spec = {"num_prompts": 3, "sampler": {"name": "transformers", "max_new_tokens": MAX_NEW_TOKENS}, **(samples or {})}
    train = {"eval_every": 2, "epochs": 2, **sections.pop("train", {})}  # 3 steps an epoch
    output = {"trackers": [], "save_model": False, **sections.pop("output", {})}
    return tiny_recipe(tmp_path, steps=steps, data={"eval_split": "train"}, train=train, output=output,
                       eval={"at_start": True, "samples": spec}, **sections)


def train(tree: dict, plugins=None) -> dict:
    plugins = plugins or default_plugins()
    return engine.run(validated_with(tree, plugins), plugins, show_progress=False)


def validated_with(tree: dict, plugins):
    from prefopt.recipe import validate_tree

    return validate_tree(tree, plugins, "test recipe")


def sample_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def steps_of(lines: list[dict]) -> list[int]:
    return sorted({line["step"] for line in lines})


# ----------------------------------------------------------------------------------------------------------
# samples.jsonl


def test_each_evaluation_samples_every_prompt_with_its_judge_score(tmp_path):
    train(samples_tree(tmp_path, {"judge": JUDGE}))
    lines = sample_lines(tmp_path / "run")
    assert [line["step"] for line in lines] == [0, 0, 0, 2, 2, 2, 4, 4, 4]  # at the start, every 2 steps, the end
    assert [line["prompt_index"] for line in lines] == [0, 1, 2] * 3
    assert [line["prompt"] for line in lines[:3]] == [prompt for prompt, _, _ in PAIRS[:3]]
    for line in lines:
        assert set(line) == {"step", "prompt_index", "sample", "prompt", "completion", "tokens", "finished", "scores"}
        assert 1 <= line["tokens"] <= MAX_NEW_TOKENS and isinstance(line["finished"], bool)
        assert line["scores"] == {"judge": float(len(line["completion"]))}  # the judge scored this very text
    assert lines[0]["completion"] != lines[6]["completion"]  # the weights moved (or the seed did)
    metrics = {(m["step"], key): value for m in metric_lines(tmp_path / "run") for key, value in m.items()}
    for step in (0, 2, 4):
        of_step = [line for line in lines if line["step"] == step]
        assert metrics[step, "eval/samples/tokens"] == pytest.approx(sum(x["tokens"] for x in of_step) / 3)
        judged = sum(len(x["completion"]) for x in of_step) / 3
        assert metrics[step, "eval/samples/score/judge"] == pytest.approx(judged)


def test_every_and_per_prompt(tmp_path):
    train(samples_tree(tmp_path, {"every": 3, "per_prompt": 2, "num_prompts": 2}))
    lines = sample_lines(tmp_path / "run")
    assert [(x["step"], x["prompt_index"], x["sample"]) for x in lines] == [
        (step, prompt, k) for step in (0, 3, 4) for prompt in (0, 1) for k in (0, 1)]
    assert all("scores" not in line for line in lines)  # no judge, no task: nothing scores them


def test_sampling_leaves_training_as_it_was(tmp_path):
    train(samples_tree(tmp_path / "with"))
    plain = samples_tree(tmp_path / "without")
    del plain["eval"]["samples"]
    train(plain)
    assert train_losses(tmp_path / "with" / "run") == train_losses(tmp_path / "without" / "run")


def test_a_resumed_run_samples_what_the_uninterrupted_one_did(tmp_path, capsys):
    """A crash after the end's samples were written but before the final checkpoint: the rerun resumes at step 2,
    and samples.jsonl (and the sample metrics) read exactly as the uninterrupted run's, no step twice."""
    tree = samples_tree(tmp_path / "full", {"judge": JUDGE}, train={"save_every": 2})
    train(tree)
    full = (tmp_path / "full" / "run" / "samples.jsonl").read_text()

    tree = samples_tree(tmp_path / "killed", {"judge": JUDGE}, train={"save_every": 2})
    train(tree)
    run_dir = tmp_path / "killed" / "run"
    shutil.rmtree(run_dir / "checkpoints" / "step-0000004")  # as if the run died before writing it
    with open(run_dir / "samples.jsonl", "a") as file:
        file.write('{"step": 4, "prompt_ind')  # and in the middle of a line
    capsys.readouterr()
    train(tree)
    out = capsys.readouterr().out
    assert "resuming from" in out and "samples.jsonl was cut off by an interrupted write" in out
    assert (run_dir / "samples.jsonl").read_text() == full
    def sample_metrics(folder: Path) -> list[tuple[int, float]]:
        return [(m["step"], m["eval/samples/tokens"]) for m in metric_lines(folder) if "eval/samples/tokens" in m]

    assert sample_metrics(run_dir) == sample_metrics(tmp_path / "full" / "run")
    assert [step for step, _ in sample_metrics(run_dir)] == [0, 2, 4]

    train(tree)  # a finished run run again: it resumes at its end and samples the end again, once
    assert (run_dir / "samples.jsonl").read_text() == full


def test_cut_back_keeps_the_steps_before_the_resumed_one(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"step": step, "prompt_index": 0}) + "\n" for step in (0, 2, 4)))
    samples_module.cut_back(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0]
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(PrefoptError, match=r"samples.jsonl line 2 is not a samples record"):
        samples_module.cut_back(path, 2)


# ----------------------------------------------------------------------------------------------------------
# the trackers' tables


def test_tensorboard_gets_a_markdown_table_at_each_sampling(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    train(samples_tree(tmp_path, {"judge": JUDGE}, output={"trackers": ["tensorboard"]}))
    lines = sample_lines(tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = {e.step: make_ndarray(e.tensor_proto).item().decode() for e in events.Tensors("completions/text_summary")}
    assert sorted(texts) == [0, 2, 4]
    for step, text in texts.items():
        rows = text.splitlines()
        assert rows[0] == ("| step | prompt_index | sample | prompt | completion | tokens | finished | "
                           "score/judge |")
        assert len(rows) == 2 + 3  # the header, its rule, a row per completion
        for row, line in zip(rows[2:], [x for x in lines if x["step"] == step]):
            assert row.startswith(f"| {step} | {line['prompt_index']} | 0 | {line['prompt']} | ")
            assert row.endswith(f" | {line['tokens']} | {line['finished']} | {line['scores']['judge']:.4g} |")


def test_mlflow_gets_a_table_artifact_at_each_sampling(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.7+ refuses the file store unless told
    uri = (tmp_path / "mlruns").as_uri()
    trackers = {"mlflow": {"tracking_uri": uri, "experiment_name": "samples"}}
    train(samples_tree(tmp_path, {"judge": JUDGE}, output={"trackers": trackers}))
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("samples").experiment_id])
    files = sorted(f.path for f in client.list_artifacts(run.info.run_id, "completions"))
    assert files == [f"completions/step-000000{step}.json" for step in (0, 2, 4)]
    lines = sample_lines(tmp_path / "run")
    local = Path(client.download_artifacts(run.info.run_id, "completions/step-0000002.json", str(tmp_path)))
    table = json.loads(local.read_text())
    assert table["columns"] == ["step", "prompt_index", "sample", "prompt", "completion", "tokens", "finished",
                                "score/judge"]
    assert [row[4] for row in table["data"]] == [x["completion"] for x in lines if x["step"] == 2]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/samples/score/judge")}
    assert sorted(history) == [0, 2, 4]


class TableTracker:
    """A started tracker with accelerate's ``log_table`` (as W&B's and ClearML's have), recording its calls."""

    def __init__(self):
        self.calls = []

    def log_table(self, table_name, columns=None, data=None, dataframe=None, step=None, **kwargs):
        self.calls.append((table_name, columns, data, step))


class PlainTracker:
    """A started tracker that takes no table (comet_ml, aim, ... as accelerate has them)."""


def test_a_tracker_with_log_table_gets_the_rows_as_they_are():
    from prefopt.engine.trackers import log_table

    tracker = TableTracker()
    accelerator = type("Accelerator", (), {"is_main_process": True, "trackers": [tracker, PlainTracker()]})()
    log_table(accelerator, "completions", ["step", "completion"], [[2, "a | b"]], step=2)
    assert tracker.calls == [("completions", ["step", "completion"], [[2, "a | b"]], 2)]
    accelerator.is_main_process = False
    log_table(accelerator, "completions", ["step"], [[4]], step=4)
    assert len(tracker.calls) == 1  # the other processes log nothing


def test_a_markdown_cell_keeps_its_pipes_and_line_breaks_inside():
    table = markdown_table(["a", "b"], [["x | y", "one\ntwo"], [0.123456, None]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x \\| y | one<br>two |", "| 0.1235 |  |"]


# ----------------------------------------------------------------------------------------------------------
# a task's own prompts and score (the task contract's optional eval_prompts and score)


class EchoConfig(TaskConfig):
    own_prompts: bool = Field(True, description="Give eval_prompts (else the held-out file's prompts are used).")


class EchoTask(Task):
    """A test task: the sample pairs as its data, two prompts of its own, a score of 10 per character."""

    name = "echo_test_task"
    Config = EchoConfig

    def build(self, ctx) -> TaskData:
        folder = Path(ctx.cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return TaskData(train=preference_file(folder / "train.jsonl"), eval=preference_file(folder / "eval.jsonl",
                                                                                            PAIRS[6:]))

    def eval_prompts(self, data):
        return ["Once upon a time", "My favourite film"] if self.config.own_prompts else None

    def score(self, prompts, completions):
        return [10.0 * len(text) for text in completions]


@hookimpl
def prefopt_register_tasks():
    return [EchoTask]


@pytest.mark.parametrize("own_prompts", [True, False])
def test_a_task_gives_its_prompts_and_scores_each_completion(tmp_path, own_prompts):
    plugins = load_plugins(extra=[__name__])  # this module registers the task
    tree = samples_tree(tmp_path, {"judge": JUDGE})
    tree["data"] = {"task": {"name": "echo_test_task", "own_prompts": own_prompts}, "max_length": 48,
                    "max_prompt_length": 24}
    train(tree, plugins)
    lines = sample_lines(tmp_path / "run")
    prompts = ["Once upon a time", "My favourite film"] if own_prompts else [p for p, _, _ in PAIRS[6:9]]
    assert [x["prompt"] for x in lines if x["step"] == 0] == prompts
    for line in lines:
        assert line["scores"] == {"task": 10.0 * len(line["completion"]), "judge": float(len(line["completion"]))}


def test_the_sentiment_task_gives_its_held_out_openings_and_vader_scores(tmp_path):
    pytest.importorskip("vaderSentiment")
    from prefopt_plugins.tasks.sentiment.pairs import EVAL_PROMPTS_FILE
    from prefopt_plugins.tasks.sentiment.reward import vader_reward
    from prefopt_plugins.tasks.sentiment.task import SentimentTask

    (tmp_path / EVAL_PROMPTS_FILE).write_text("".join(
        json.dumps({"snippet_id": i, "text": text}) + "\n" for i, text in enumerate(["A film", "The plot"])))
    task = SentimentTask(SentimentTask.Config())
    data = TaskData(train=tmp_path / "train.jsonl", eval=tmp_path / "eval.jsonl", scored=tmp_path / EVAL_PROMPTS_FILE)
    assert task.eval_prompts(data) == ["A film", "The plot"]
    completions = [" is a wonderful delight.", " is awful and boring."]
    scores = task.score(["A film", "The plot"], completions)
    assert scores == vader_reward(completions) and scores[0] > 0.5 and scores[1] < -0.5


# ----------------------------------------------------------------------------------------------------------
# mistakes, as one line


@pytest.mark.parametrize("samples, data, message", [
    ({"sampler": {"name": "transformer"}}, {},
     "eval.samples.sampler.name: unknown sampler 'transformer' (did you mean 'transformers'?)"),
    ({"sampler": {"name": "transformers", "max_new_token": 4}}, {},
     "eval.samples.sampler.max_new_token: "),
    ({"judge": {"name": "llm_pairwise", "model": "x"}}, {},  # its options are not even looked at
     "eval.samples.judge: judge 'llm_pairwise' compares completions in pairs and gives no score of one completion"),
    ({}, {"eval_split": None}, "eval.samples samples held-out prompts, and this run has none: set data.eval_split"),
])
@pytest.mark.parametrize("command", [["validate"], ["train", "--no-progress"]])
def test_a_mistake_in_eval_samples_is_one_line(tmp_path, capsys, samples, data, message, command):
    tree = samples_tree(tmp_path, samples)
    tree["data"].update(data)
    path = write_recipe(tree, tmp_path / "recipe.yaml")
    capsys.readouterr()
    err = one_line_error(capsys, [command[0], str(path), *command[1:]])
    assert message in err, err
    assert not (tmp_path / "run" / "samples.jsonl").exists()


def test_samples_need_a_sampler(tmp_path):
    tree = samples_tree(tmp_path)
    del tree["eval"]["samples"]["sampler"]
    with pytest.raises(Exception, match=r"eval\.samples\.sampler"):
        validated(tree)
