"""A full disk (ENOSPC) or a refused write (EACCES) while writing a checkpoint, a reference cache, metrics.jsonl
or the model ends the run with one line naming the path and the fix; nothing partial is left looking whole, and
the checkpoints already written stay, so a rerun after freeing space continues exactly.

The real thing runs on a small tmpfs where this process may mount one (root); the same faults are also raised
by monkeypatching the write functions, as the libraries raise them (``torch.save``: no errno at all)."""

from __future__ import annotations

import errno
import subprocess

import pytest
import torch
import yaml

from helpers import tiny_recipe, train_losses, validated
from prefopt import engine
from prefopt.disk import WriteError
from prefopt.engine.records import append_line

# Tiny-model checkpoints weigh about 19 MB (weights and AdamW's two moments): one fits, two do not.
TMPFS_SIZE = "28m"


def recipe_file(tmp_path, model_dir, data, out, **train) -> str:
    tree = tiny_recipe(model_dir, data, out, train={"max_steps": 6, "epochs": 2, "save_every": 2,
                                                    "keep_checkpoints": 1, **train},
                       output={"dir": str(out), "trackers": [], "save_model": False})
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.fixture()
def quiet_cli(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # the CLI sets it; restored after the test


@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the monkeypatched tests cover the same paths")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def one_line_error(capsys, argv) -> str:
    """The CLI run in this process on ``argv``: exit status 2 and one error line, no traceback. In this process
    the libraries' progress bars (datasets, transformers) print to stderr too, so lines with a bar's rate are not
    counted; a ``prefopt`` subprocess with --no-progress shows none."""
    from prefopt.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and "/s]" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("prefopt: error: ")
    return lines[0]


def checkpoint_names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_the_rerun_continues_exactly(
    tiny_model_dir, pairs_file, tmp_path, small_disk, capsys, quiet_cli
):
    full = tmp_path / "uninterrupted"
    assert engine.train(validated(yaml.safe_load(open(recipe_file(tmp_path, tiny_model_dir, pairs_file, full)))),
                        show_progress=False)
    out = small_disk / "run"
    recipe = recipe_file(tmp_path, tiny_model_dir, pairs_file, out)

    err = one_line_error(capsys, ["train", recipe, "--no-progress"])
    checkpoints = out / "checkpoints"
    assert err == (f"prefopt: error: no space left on device writing checkpoint {checkpoints / 'step-0000004'}: "
                   f"free space on that disk (df -h {checkpoints}), or set output.dir to another disk, then rerun")
    assert checkpoint_names(out) == ["step-0000002"], "the partial checkpoint is removed, the last whole one kept"
    assert list(train_losses(out)) == [1, 2, 3, 4]

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    capsys.readouterr()
    from prefopt.cli import main

    assert main(["train", recipe, "--no-progress"]) == 0
    assert "resuming from" in capsys.readouterr().out
    resumed, expected = train_losses(out), train_losses(full)
    assert list(resumed) == list(expected) == [1, 2, 3, 4, 5, 6]
    for step, value in expected.items():
        assert resumed[step] == pytest.approx(value, rel=0, abs=1e-6), step


def test_a_full_disk_while_appending_metrics_leaves_no_torn_line(small_disk):
    metrics = small_disk / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 0.69}\n')
    before = metrics.read_bytes()
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the disk to within a few hundred bytes
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    with pytest.raises(WriteError) as caught:
        append_line(metrics, '{"step": 2, "loss": ' + "0" * 20_000 + "}")
    assert str(caught.value).startswith(f"no space left on device writing metrics {metrics}: free space")
    assert metrics.read_bytes() == before


def failing_on(target: str, error: BaseException, real=torch.save):
    """``torch.save`` that raises ``error`` for files of the checkpoint named ``target``."""
    def save(obj, f, *args, **kwargs):
        if target in str(f):
            raise error
        return real(obj, f, *args, **kwargs)

    return save


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device writing checkpoint "
     "{folder}/step-0000004: free space on that disk (df -h {folder}), or set output.dir to another disk, then rerun"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied writing checkpoint {folder}/step-0000004: "
     "make {folder} writable by this user, or set output.dir to a writable place, then rerun"),
], ids=["ENOSPC", "EACCES"])
def test_a_failed_checkpoint_write_is_one_line_and_leaves_the_older_checkpoint(
    tiny_model_dir, pairs_file, tmp_path, capsys, monkeypatch, quiet_cli, error, expected
):
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", failing_on("step-0000004", error))
    err = one_line_error(capsys, ["train", recipe_file(tmp_path, tiny_model_dir, pairs_file, out), "--no-progress"])
    assert err == "prefopt: error: " + expected.format(folder=out / "checkpoints")
    assert checkpoint_names(out) == ["step-0000002"]


def test_torch_saves_full_disk_without_an_errno_is_recognised(tiny_model_dir, pairs_file, tmp_path, capsys,
                                                              monkeypatch, quiet_cli):
    """torch.save on a full disk raises a RuntimeError with no errno; the disk's free space tells."""
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", failing_on("step-0000004", RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")))
    monkeypatch.setattr("prefopt.disk.free_bytes", lambda path: 0)
    err = one_line_error(capsys, ["train", recipe_file(tmp_path, tiny_model_dir, pairs_file, out), "--no-progress"])
    assert err.startswith(f"prefopt: error: no space left on device writing checkpoint {out / 'checkpoints'}/")
    assert checkpoint_names(out) == ["step-0000002"]


def test_other_errors_while_writing_pass_through(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", failing_on("step-0000002", RuntimeError("a bug, not the disk")))
    tree = yaml.safe_load(open(recipe_file(tmp_path, tiny_model_dir, pairs_file, tmp_path / "run")))
    with pytest.raises(RuntimeError, match="a bug, not the disk"):
        engine.train(validated(tree), show_progress=False)


def test_a_full_disk_while_writing_metrics_is_undone(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n')
    real_write = __import__("os").write

    def half_then_full(fd, data):
        if len(data) > 10:
            real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr("os.write", half_then_full)
    with pytest.raises(WriteError, match=f"no space left on device writing metrics {metrics}: free space"):
        append_line(metrics, '{"step": 2, "loss": 0.5}')
    monkeypatch.undo()
    assert metrics.read_text() == '{"step": 1}\n'


def test_a_full_disk_while_building_a_reference_cache_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    from prefopt.data.types import TokenizedPair, TokenizedPairs
    from prefopt.paths import cache_root
    from prefopt.reference import cache as reference_cache
    from prefopt.reference.providers import LiveReference

    class SafetensorError(Exception):
        """What safetensors raises, with the OS error in its text only."""

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\0" * 64)  # part written, then the disk is full
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(reference_cache, "save_file", full)
    pairs = TokenizedPairs(source="t", fingerprint="disk-full", pairs=[TokenizedPair(0, (1, 5), (7, 2), (9, 2))])
    target = reference_cache.cache_path(reference_cache.cache_key("w", pairs, "float32/no"))
    with pytest.raises(WriteError) as caught:
        reference_cache.cached_reference(LiveReference(tiny_model), pairs, weights="w", dtype="float32/no",
                                         batch_size=2, pad_id=2, show_progress=False)
    assert str(caught.value) == (f"no space left on device writing {target}: free space on that disk (df -h "
                                 f"{target.parent}), or set PREFOPT_CACHE to another disk, then rerun")
    assert [p.name for p in (cache_root() / "reference").iterdir()] == [], "no partial file, temp or lock left"


def test_a_full_disk_while_saving_the_model_keeps_the_final_checkpoint(tiny_model_dir, pairs_file, tmp_path,
                                                                       capsys, monkeypatch, quiet_cli):
    from transformers import PreTrainedModel

    def full(self, directory, *args, **kwargs):
        (directory / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (directory / "model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "run"
    tree = tiny_recipe(tiny_model_dir, pairs_file, out, train={"max_steps": 2})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    err = one_line_error(capsys, ["train", str(path), "--no-progress"])
    assert err == (f"prefopt: error: no space left on device writing the model {out / 'model'}: free space on that "
                   f"disk (df -h {out}), or set output.dir to another disk, then rerun")
    assert not (out / "model").exists() and not (out / ".model.tmp").exists()
    assert checkpoint_names(out) == ["step-0000002"]
