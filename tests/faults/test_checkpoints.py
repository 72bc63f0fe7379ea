"""Damaged checkpoints: every file of a checkpoint, truncated or with a bit flipped, is found by its manifest;
the run reports it in one line and resumes the previous intact checkpoint, to the losses of a run that was never
damaged. A writer killed (SIGKILL) or refused (disk full) between a checkpoint's files leaves nothing a rerun
would take for a checkpoint."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PAIRS, write_jsonl
from helpers import one_line_error, tiny_recipe, train_losses, validated
from prefopt import engine
from prefopt.cli import main
from prefopt.engine import checkpoint as ckpt
from prefopt.errors import PrefoptError
from prefopt.integrity import verify_manifest

FILES = ["trainable.safetensors", "optimizer.pt", "rng.safetensors", "state.json", "recipe.yaml", ".prefopt",
         "MANIFEST.json"]
QUICK = {"epochs": 2, "micro_batch_size": 4, "save_every": 2, "keep_checkpoints": 3}  # one forward per step


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A run stopped after step 4 (checkpoints at steps 2 and 4), and the losses of 6 undamaged steps."""
    root = tmp_path_factory.mktemp("checkpoint-runs")
    data = write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])

    def tree(out: Path, max_steps: int) -> dict:
        return tiny_recipe(tiny_model_dir, data, out, train={**QUICK, "max_steps": max_steps})

    engine.train(validated(tree(root / "whole", 6)), show_progress=False)
    engine.train(validated(tree(root / "four", 4)), show_progress=False)
    return {"tree": tree, "four": root / "four", "losses": train_losses(root / "whole")}


@pytest.fixture()
def four(runs, tmp_path) -> Path:
    """A fresh copy of the run stopped after step 4, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(runs["four"], copy)
    return copy


def write_recipe(runs, out: Path, max_steps: int = 6) -> Path:
    path = out.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(runs["tree"](out, max_steps)))
    return path


@pytest.mark.parametrize("damage", [flip_bit, truncate])
@pytest.mark.parametrize("name", FILES)
def test_any_damaged_file_makes_the_previous_checkpoint_the_one_resumed(four, name, damage):
    damage(step_dir(four, 4) / name)
    notes = []
    assert ckpt.latest_checkpoint(four, say=notes.append) == step_dir(four, 2)
    [note] = notes
    assert note.startswith(f"checkpoint {step_dir(four, 4)} is damaged (")
    assert note.endswith("; trying the one before it")
    if name != "MANIFEST.json":  # a damaged manifest may read as unreadable, or as another file's sum
        assert name in note


def test_a_damaged_newest_checkpoint_is_reported_and_the_rerun_matches_an_undamaged_run(runs, four, capsys):
    flip_bit(step_dir(four, 4) / "trainable.safetensors")
    assert main(["train", str(write_recipe(runs, four)), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {step_dir(four, 4)} is damaged (trainable.safetensors has a different sha256" in out
    assert f"resuming from {step_dir(four, 2)} (step 2 of 6)" in out
    resumed = train_losses(four)
    assert list(resumed) == [1, 2, 3, 4, 5, 6]
    for step, loss in runs["losses"].items():
        assert resumed[step] == pytest.approx(loss, rel=0, abs=1e-6), step
    assert verify_manifest(step_dir(four, 4)) == []  # the damaged one was replaced when the run got there


def test_no_intact_checkpoint_is_one_line_and_nothing_is_deleted(runs, four, capsys):
    truncate(step_dir(four, 4) / "optimizer.pt")
    flip_bit(step_dir(four, 2) / "state.json")
    err = one_line_error(capsys, ["train", str(write_recipe(runs, four)), "--no-progress"])
    assert f"no intact checkpoint in {four / 'checkpoints'} (step-0000004: optimizer.pt has " in err
    assert "step-0000002: state.json has a different sha256" in err
    assert step_dir(four, 4).is_dir() and step_dir(four, 2).is_dir()


def test_a_checkpoint_from_before_manifests_resumes_unverified_with_a_note(four):
    (step_dir(four, 4) / "MANIFEST.json").unlink()
    notes = []
    assert ckpt.latest_checkpoint(four, say=notes.append) == step_dir(four, 4)
    assert notes == [f"checkpoint {step_dir(four, 4)} has no MANIFEST.json (written by an older prefopt): "
                     "resuming it unverified"]


def test_sigkill_between_a_checkpoints_files_leaves_no_checkpoint_to_resume(runs, tmp_path):
    """The writer is killed after every data file of step 4's checkpoint and before its manifest: the worst
    moment. The folder never gets its name, so the rerun resumes step 2 and reproduces the undamaged losses."""
    out = tmp_path / "run"
    recipe = write_recipe(runs, out)
    killer = textwrap.dedent(f"""
        import os, signal, sys
        from prefopt.engine import checkpoint
        real = checkpoint.write_manifest
        def write_manifest(folder, names=None):
            if ".step-0000004." in str(folder):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(folder, names)
        checkpoint.write_manifest = write_manifest
        from prefopt.cli import main
        sys.exit(main(["train", {str(recipe)!r}, "--no-progress"]))
    """)
    process = subprocess.run([sys.executable, "-c", killer], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                             capture_output=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    [partial] = (out / "checkpoints").glob(".step-0000004.*.tmp")
    assert (partial / "trainable.safetensors").exists() and not (partial / "MANIFEST.json").exists()
    assert [p.name for _, p in ckpt.checkpoints(out)] == ["step-0000002"]

    engine.train(validated(runs["tree"](out, 6)), show_progress=False)
    assert not partial.exists()  # removed when the rerun took the run directory
    resumed = train_losses(out)
    for step, loss in runs["losses"].items():
        assert resumed[step] == pytest.approx(loss, rel=0, abs=1e-6), step


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_folder(runs, tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if ".step-0000004." in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(PrefoptError, match=r"^no space left on device writing checkpoint .*step-0000004: free space"):
        engine.train(validated(runs["tree"](out, 6)), show_progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
    assert verify_manifest(step_dir(out, 2)) == []
