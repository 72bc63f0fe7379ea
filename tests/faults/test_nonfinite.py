"""Non-finite training: a recipe holding inf or NaN is refused, a step whose loss or gradient is not finite is
never applied, the run stops with exit status 3 (or skips the step, if asked), and no checkpoint is ever written
from non-finite weights, so the newest finite one survives rotation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import metric_lines, one_line_error, tiny_recipe, train_losses, validated
from prefopt import Phase, engine
from prefopt.cli import main
from prefopt.errors import NonFiniteError, RecipeError


# 6 steps over the 12 pairs, one forward each
QUICK = {"epochs": 2, "max_steps": 6, "micro_batch_size": 4}


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))


def poison_steps(monkeypatch, steps: set[int]) -> None:
    """Make the loss of training steps ``steps`` (1-based, as metrics.jsonl counts them) NaN, and so their
    gradients: what a diverging run produces, at chosen steps."""
    from prefopt.engine import loop

    current = {}
    real_batches, real_forward = loop.process_micro_batches, loop.forward_pairs

    def batches(run, step):
        current["step"] = step + 1
        return real_batches(run, step)

    def forward(run, batch, reference):
        logps, output = real_forward(run, batch, reference)
        if current.get("step") in steps:
            output = dataclasses.replace(output, loss=output.loss * math.nan)
        return logps, output

    monkeypatch.setattr(loop, "process_micro_batches", batches)
    monkeypatch.setattr(loop, "forward_pairs", forward)


@dataclasses.dataclass
class Snapshots(Phase):
    """Records the trainable weights after every step (0-based step -> name -> tensor)."""

    taken: dict = dataclasses.field(default_factory=dict)

    def after_step(self, ctx, step):
        self.taken[step] = {n: p.detach().clone() for n, p in ctx.policy.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------------
# the recipe


@pytest.mark.parametrize("key, value, shown", [
    ("loss.beta", math.inf, "inf"),  # within its bound, gt=0
    ("loss.beta", 1e999, "inf"),  # YAML reads 1e999 as inf
    ("train.max_grad_norm", "inf", "inf"),  # pydantic reads the string into a float
    ("train.optimizer", {"name": "SGD", "momentum": math.nan}, "nan"),  # an option beside a name: no bounds
])
def test_a_non_finite_number_anywhere_in_a_recipe_is_refused_naming_its_key(tiny_model_dir, pairs_file, tmp_path,
                                                                            key, value, shown):
    section, name = key.split(".")
    tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "run", **{section: {name: value}})
    with pytest.raises(RecipeError) as caught:
        validated(tree)
    where = "train.optimizer.momentum" if name == "optimizer" else key
    assert str(caught.value) == f"test recipe: {where}: {shown} is not a finite number; give a finite value"


def test_inf_from_the_command_line_is_one_line_and_nothing_runs(tiny_model_dir, pairs_file, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "run")))
    err = one_line_error(capsys, ["train", str(path), "loss.beta=.inf", "--no-progress"])
    assert "loss.beta: inf is not a finite number" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# train.on_nonfinite=stop


def test_a_diverging_run_stops_with_status_3_and_keeps_its_newest_finite_checkpoint(
    tiny_model_dir, pairs_file, tmp_path, capsys
):
    """learning_rate=1e8 diverges within a few steps. Before the guard the run exited 0 having written NaN
    checkpoints over the finite ones (keep_checkpoints=1); now it stops at the first non-finite step."""
    out = tmp_path / "run"
    tree = tiny_recipe(tiny_model_dir, pairs_file, out,
                       train={**QUICK, "learning_rate": 1e8, "save_every": 1, "keep_checkpoints": 1})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert main(["train", str(path), "--no-progress"]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("prefopt: error: step ") and "non-finite loss or gradient" in err
    [newest] = checkpoint_names(out)
    assert f"the newest checkpoint is {out / 'checkpoints' / newest} (finite weights)" in err
    assert "--allow-changed train.learning_rate" in err
    weights = load_file(out / "checkpoints" / newest / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "summary.json").exists() and not (out / "model").exists()
    assert all(math.isfinite(loss) for loss in train_losses(out).values())


def test_rotation_keeps_the_last_finite_checkpoint_and_the_run_resumes_from_it(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch
):
    """A NaN at step 4 of a healthy run: the run stops, step 3's checkpoint survives (keep_checkpoints=1), and
    once the cause is gone the rerun continues from it to the losses of a run that never saw the NaN."""
    train = {**QUICK, "save_every": 1, "keep_checkpoints": 1}
    clean = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "clean", train=train)
    engine.train(validated(clean), show_progress=False)

    poison_steps(monkeypatch, {4})
    out = tmp_path / "run"
    tree = tiny_recipe(tiny_model_dir, pairs_file, out, train=train)
    with pytest.raises(NonFiniteError, match=r"^step 4 of .*; the newest checkpoint is .*step-0000003 ") as caught:
        engine.train(validated(tree), show_progress=False)
    assert caught.value.exit_status == 3
    assert checkpoint_names(out) == ["step-0000003"]
    assert list(train_losses(out)) == [1, 2, 3]  # the NaN step is not recorded as if it had trained

    monkeypatch.undo()
    engine.train(validated(tree), show_progress=False)
    expected, got = train_losses(tmp_path / "clean"), train_losses(out)
    assert list(got) == [1, 2, 3, 4, 5, 6]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=0, abs=1e-6), step


def test_weights_that_overflow_are_never_checkpointed(tiny_model_dir, pairs_file, tmp_path):
    """Finite gradients can still overflow the weights; the checkpoint of that step is refused, the one before
    it kept."""

    @dataclasses.dataclass
    class Overflow(Phase):
        def after_step(self, ctx, step):
            if step == 3:  # the update of step 4
                with torch.no_grad():
                    next(p for p in ctx.policy.parameters() if p.requires_grad).fill_(math.inf)

    out = tmp_path / "run"
    tree = tiny_recipe(tiny_model_dir, pairs_file, out, train={**QUICK, "save_every": 2, "keep_checkpoints": 1})
    with pytest.raises(NonFiniteError, match=r"^step 4 of .*the weights hold inf or NaN .*step-0000002 "):
        engine.train(validated(tree), phase=Overflow(), show_progress=False)
    assert checkpoint_names(out) == ["step-0000002"]


# ----------------------------------------------------------------------------------------------------------
# train.on_nonfinite=skip_step


def test_a_skipped_step_changes_nothing_is_counted_and_resumes_exactly(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    poison_steps(monkeypatch, {2})
    train = {**QUICK, "max_steps": 4, "save_every": 2, "on_nonfinite": "skip_step"}
    whole = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "whole", train=train)
    snapshots = Snapshots()
    summary = engine.train(validated(whole), phase=snapshots, show_progress=False)
    assert "step 2: non-finite loss or gradient (loss nan" in capsys.readouterr().out
    for name, weights in snapshots.taken[0].items():  # the weights after step 1 are those after step 2
        assert torch.equal(snapshots.taken[1][name], weights), name
    lines = {line["step"]: line for line in metric_lines(tmp_path / "whole") if "loss" in line}
    assert [lines[s]["skipped"] for s in (1, 2, 3, 4)] == [0, 1, 0, 0]
    assert [lines[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert summary["skipped_steps"] == 1
    assert json.loads((tmp_path / "whole" / "summary.json").read_text())["skipped_steps"] == 1

    # stopped after step 2, then continued (max_steps may change): the same losses, the count carried on
    parts = tmp_path / "parts"
    engine.train(validated(tiny_recipe(tiny_model_dir, pairs_file, parts, train={**train, "max_steps": 2})),
                 show_progress=False)
    resumed = engine.train(validated(tiny_recipe(tiny_model_dir, pairs_file, parts, train=train)), show_progress=False)
    assert resumed["skipped_steps"] == 1
    expected, got = train_losses(tmp_path / "whole"), train_losses(parts)
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=0, abs=1e-6), step


def test_too_many_non_finite_steps_in_a_row_stop_a_skipping_run(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    poison_steps(monkeypatch, {2, 3, 4, 5, 6})
    out = tmp_path / "run"
    tree = tiny_recipe(tiny_model_dir, pairs_file, out, train={
        **QUICK, "save_every": 1, "on_nonfinite": "skip_step", "max_nonfinite_in_a_row": 3})
    with pytest.raises(NonFiniteError, match=r"^steps 2-4 of .* stopped after train.max_nonfinite_in_a_row=3 in a "
                                             r"row; the newest checkpoint is .*step-0000003 "):
        engine.train(validated(tree), show_progress=False)
    # skipped steps change no weight, so their checkpoints hold finite weights too
    assert checkpoint_names(out) == ["step-0000002", "step-0000003"]
