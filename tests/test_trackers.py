"""output.trackers: any of accelerate's trackers with options, checked at recipe load, and what each receives.

TensorBoard, MLflow (a local file store) and W&B (offline) are run for real on the tiny model and read back
with their own readers; the other trackers accelerate supports are only checked by name and package.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from helpers import metric_lines, one_line_error, train_losses, validated
from prefopt import engine
from prefopt.engine import trackers
from prefopt.errors import PrefoptError, RecipeError
from prefopt.testing import tiny_recipe


def tree_with(tmp_path: Path, output: dict, steps: int = 3, **sections) -> dict:
    return tiny_recipe(tmp_path, steps=steps, output={"save_model": False, **output}, **sections)


def train(tree: dict) -> dict:
    return engine.run(validated(tree), show_progress=False)


def recipe_file(tree: dict, path: Path, capsys) -> str:
    """``tree`` saved for the CLI, with what building the tiny model printed cleared away."""
    path.write_text(yaml.safe_dump(tree))
    capsys.readouterr()
    return str(path)


def event_folders(run_dir: Path) -> list[Path]:
    return sorted({path.parent for path in run_dir.rglob("events.out.tfevents.*")})


# ----------------------------------------------------------------------------------------------------------
# the recipe's value


@pytest.mark.parametrize("given, expected", [
    (["tensorboard", "wandb"], {"tensorboard": {}, "wandb": {}}),
    ("wandb", {"wandb": {}}),
    ([], {}),
    ({"wandb": {"project": "x", "name": "run1", "tags": ["a"], "entity": "me"}, "mlflow": None},
     {"wandb": {"project": "x", "name": "run1", "tags": ["a"], "entity": "me"}, "mlflow": {}}),
    (["tensorboard", {"mlflow": {"tracking_uri": "file:///tmp/m", "experiment_name": "e"}}],
     {"tensorboard": {}, "mlflow": {"tracking_uri": "file:///tmp/m", "experiment_name": "e"}}),
])
def test_trackers_are_a_list_of_names_or_a_mapping_of_options(tmp_path, given, expected):
    recipe = validated(tree_with(tmp_path, {"trackers": given}))
    assert recipe.output.trackers == expected


def test_the_default_is_tensorboard(tmp_path):
    tree = tree_with(tmp_path, {})
    del tree["output"]["trackers"]
    assert validated(tree).output.trackers == {"tensorboard": {}}


@pytest.mark.parametrize("given, message", [
    (["tensorbord"], "output.trackers: unknown tracker 'tensorbord' (did you mean 'tensorboard'?); accelerate "
                     "supports aim, clearml, comet_ml, dvclive, mlflow, swanlab, tensorboard, trackio, wandb"),
    ({"mlflow": {"trackin_uri": "file:///x"}}, "output.trackers: unknown option 'trackin_uri' of tracker 'mlflow' "
                                              "(did you mean 'tracking_uri'?)"),
    ({"tensorboard": {"log_dir": "elsewhere"}}, "output.trackers: option 'log_dir' of tracker 'tensorboard' is set "
                                                "by prefopt"),
    (["wandb", {"wandb": {"project": "x"}}], "output.trackers: wandb named twice"),
    ([3], "output.trackers: 3 is not a tracker name"),
])
def test_a_tracker_mistake_is_one_line_at_validate(tmp_path, capsys, given, message):
    path = recipe_file(tree_with(tmp_path, {"trackers": given}), tmp_path / "recipe.yaml", capsys)
    err = one_line_error(capsys, ["validate", path])
    assert message in err


def test_a_tracker_whose_package_is_missing_names_the_install(tmp_path, capsys):
    if importlib.util.find_spec("comet_ml") is not None:
        pytest.skip("comet_ml is installed here")
    path = recipe_file(tree_with(tmp_path, {"trackers": ["comet_ml"]}), tmp_path / "recipe.yaml", capsys)
    err = one_line_error(capsys, ["validate", path])
    assert "tracker 'comet_ml' needs the comet-ml package, which is not installed: pip install comet-ml" in err


def test_tensorboard_without_its_package(tmp_path, monkeypatch, capsys):
    """Plain TensorBoard (the default) is left out with a one-line notice and the run trains; TensorBoard with
    options is an explicit request, refused at load with the install line."""
    monkeypatch.setitem(trackers.TRACKERS, "tensorboard", trackers.Tracker("no_such_module_here", "tensorboard"))
    with pytest.raises(RecipeError, match="tracker 'tensorboard' needs the tensorboard package, which is not "
                                          "installed: pip install tensorboard"):
        validated(tree_with(tmp_path, {"trackers": {"tensorboard": {"flush_secs": 5}}}))
    train(tree_with(tmp_path, {"trackers": ["tensorboard"]}, steps=1))
    out = capsys.readouterr().out
    notices = [line for line in out.splitlines() if "TensorBoard logs are off" in line]
    assert notices == ["note: TensorBoard logs are off: the tensorboard package is not installed (pip install "
                       "tensorboard, or set output.trackers: [] to silence this); every metric is in metrics.jsonl"]
    assert event_folders(tmp_path / "run") == [] and train_losses(tmp_path / "run").keys() == {1}


# ----------------------------------------------------------------------------------------------------------
# TensorBoard: one run folder, hyperparameters and every metric in it, a resume that reads as one run


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> (step, value) of every event TensorBoard shows, in order (a repeated step shows twice)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_writes_one_run_folder_with_the_recipe_and_every_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(tree_with(tmp_path, {"trackers": ["tensorboard"]}, eval={"at_start": True}, data={"eval_split": "train"}))
    assert event_folders(run_dir) == [run_dir / "tensorboard"]  # accelerate's layout added <run>/<time>/ too
    assert not list(run_dir.rglob("hparams.yml"))
    scalars = {tag: dict(events) for tag, events in tensorboard_scalars(run_dir / "tensorboard").items()}
    for line in metric_lines(run_dir):
        for key, value in line.items():
            if key != "step":
                # TensorBoard keeps float32: a relative difference of 1e-7 is its rounding
                assert scalars[key][line["step"]] == pytest.approx(value, rel=1e-6, abs=1e-12), (key, line["step"])
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in hparams and "_hparams_/session_start_info" in hparams
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    assert values["loss.beta"].number_value == pytest.approx(0.1)
    assert values["train.max_steps"].number_value == 3 and values["loss.name"].string_value == "dpo"


def test_a_resumed_run_stays_one_tensorboard_run_without_repeated_steps(tmp_path):
    """A crash after step 4 was logged but before its checkpoint: the rerun trains 3 and 4 again from the step-2
    checkpoint, and TensorBoard shows each step once, with the rerun's values, in the one folder."""
    run_dir = tmp_path / "run"
    tree = tree_with(tmp_path, {"trackers": ["tensorboard"]}, steps=4, train={"save_every": 2, "epochs": 2})
    train(tree)
    first = train_losses(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-0000004")  # as if the run died before writing it
    # the rerun's steps 3 and 4 differ from the first run's: another learning rate, allowed on resume
    tree["train"] = {**tree["train"], "learning_rate": 5e-3, "allow_changed": ["train.learning_rate"]}
    train(tree)
    again = train_losses(run_dir)
    assert again[3] == first[3] and again[4] != first[4]  # step 4 is the first to train at the new rate
    assert event_folders(run_dir) == [run_dir / "tensorboard"]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    losses = tensorboard_scalars(run_dir / "tensorboard")["loss"]
    assert [step for step, _ in losses] == [1, 2, 3, 4]  # steps 3 and 4 of the first run are purged
    for step, loss in losses:
        assert loss == pytest.approx(again[step], rel=1e-6), step  # float32 in TensorBoard


# ----------------------------------------------------------------------------------------------------------
# MLflow (a local file store) and W&B (offline), read back


def test_mlflow_gets_the_recipe_as_params_and_the_loss_of_every_step(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    # MLflow 3.7+ refuses the file store unless told it is wanted; a database store needs SQLAlchemy.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    options = {"tracking_uri": uri, "experiment_name": "prefopt-test", "run_name": "tiny", "tags": {"kind": "test"}}
    train(tree_with(tmp_path, {"trackers": {"mlflow": options}}))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("prefopt-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny" and run.data.tags["kind"] == "test"
    params = run.data.params
    assert params["loss.name"] == "dpo" and params["loss.beta"] == "0.1" and params["train.max_steps"] == "3"
    assert params["train.learning_rate"] == "0.001" and params["output.trackers.mlflow.tracking_uri"] == uri
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == train_losses(tmp_path / "run")  # MLflow stores float64: the same numbers


def test_a_tracker_that_cannot_start_is_one_line_naming_it(tmp_path, capsys):
    tree = tree_with(tmp_path, {"trackers": {"mlflow": {"tracking_uri": "nosuchscheme://tracking"}}})
    err = one_line_error(capsys, ["train", recipe_file(tree, tmp_path / "recipe.yaml", capsys), "--no-progress"])
    assert err.startswith("prefopt: error: output.trackers.mlflow: the tracker did not start (")
    assert "'nosuchscheme://tracking'" in err and err.endswith("or leave it out of output.trackers")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # it stopped before training


class FakeTracker:
    """A started tracker as accelerate's interface shows it; ``fails`` makes its start raise."""

    def __init__(self, name: str, fails: bool = False, journal: list | None = None):
        self.name, self.fails, self.journal = name, fails, journal if journal is not None else []

    def start(self):
        if self.fails:
            raise ConnectionError("server unreachable\nmore detail")
        self.journal.append(("start", self.name))

    def store_init_configuration(self, values):
        self.journal.append(("config", self.name, dict(values)))

    def finish(self):
        self.journal.append(("finish", self.name))


class FakeAccelerator:
    is_main_process = True

    def __init__(self, *trackers):
        self.log_with, self.trackers = list(trackers), []


def test_a_failed_start_closes_the_trackers_started_before_it():
    journal = []
    accelerator = FakeAccelerator(FakeTracker("a", journal=journal), FakeTracker("b", fails=True, journal=journal))
    with pytest.raises(PrefoptError) as caught:
        trackers.start_trackers(accelerator, {"loss.beta": 0.1}, start_step=0)
    assert str(caught.value) == ("output.trackers.b: the tracker did not start (ConnectionError: server unreachable); "
                                 "check its options, login and network, or leave it out of output.trackers")
    assert journal == [("start", "a"), ("config", "a", {"loss.beta": 0.1}), ("finish", "a")]


def test_trackers_a_failed_run_left_open_are_closed_before_the_next_run_starts():
    journal = []
    first = FakeAccelerator(FakeTracker("left-open", journal=journal))
    trackers.start_trackers(first, {}, start_step=0)  # ... and the run stops on an error: never closed
    second = FakeAccelerator(FakeTracker("next", journal=journal))
    trackers.start_trackers(second, {}, start_step=0)
    assert journal == [("start", "left-open"), ("config", "left-open", {}), ("finish", "left-open"),
                       ("start", "next"), ("config", "next", {})]
    trackers.close_trackers(second)  # a run's end: finished once, and forgotten
    trackers.start_trackers(FakeAccelerator(), {}, start_step=0)
    assert journal[-1] == ("finish", "next") and journal.count(("finish", "next")) == 1 and second.trackers == []


def wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``), parsed by wandb's own protobuf ``Record``. wandb
    0.31 ships no Python reader of the file; its framing is LevelDB's log: a 7-byte file header (``:W&B``,
    magic, version), then 32 KiB blocks of chunks, each a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last) and its bytes; a block's tail too short for a header is padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, records, pending = path.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B"
    position = 7
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero fill to the end of the block
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(pending))
            pending = b""
    return records


def test_wandb_offline_gets_the_options_the_recipe_and_every_metric(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    options = {"project": "prefopt-test", "name": "run1", "tags": ["a", "b"]}
    train(tree_with(tmp_path, {"trackers": {"wandb": options}}, eval={"at_start": True}, data={"eval_split": "train"}))
    import wandb

    wandb.teardown()  # the run is finished; its service process writes the run file on its own time until it exits
    (run_file,) = [Path(p) for p in glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))]
    records = wandb_records(run_file)
    (run,) = [r.run for r in records if r.HasField("run")]
    assert run.project == "prefopt-test" and run.display_name == "run1" and list(run.tags) == ["a", "b"]
    updates = [item for r in records if r.HasField("config") for item in r.config.update]
    config = {item.key: json.loads(item.value_json) for item in updates}
    assert config["loss.name"] == "dpo" and config["loss.beta"] == 0.1 and config["train.max_steps"] == 3
    assert config["output.trackers.wandb.project"] == "prefopt-test"
    logged = {}
    for r in (r for r in records if r.HasField("history")):
        values = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
        logged.setdefault(r.history.step.num, {}).update(values)
    for line in metric_lines(tmp_path / "run"):
        step = line.pop("step")
        assert {k: logged[step][k] for k in line} == line, step  # JSON both ways: the same float64 numbers
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [0]
