"""What writers that died left (temporary files and folders named with their pid, and the unowned checkpoint
and model folders) is removed when the next run on the folder starts, with a note; a live writer's is kept, and
an old copy set aside by a writer that died mid-swap is put back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import tiny_recipe, validated
from prefopt import engine
from prefopt.data.types import TokenizedPair, TokenizedPairs
from prefopt.paths import cache_root, remove_stale_temps
from prefopt.reference.cache import cache_key, cache_path, cached_reference
from prefopt.reference.providers import LiveReference


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.fixture()
def live_pid():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


def folder_with(path, files: dict[str, bytes]):
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def test_a_run_removes_what_dead_writers_left_in_its_folder(tiny_model_dir, pairs_file, tmp_path, capsys, live_pid):
    out, dead = tmp_path / "run", dead_pid()
    checkpoints = out / "checkpoints"
    left = [
        folder_with(checkpoints / f".step-0000003.{dead}.tmp", {"trainable.safetensors": b"\0" * 1000}),
        folder_with(checkpoints / ".step-0000003.tmp", {"optimizer.pt": b"\0" * 10}),  # every process's, no pid
        folder_with(out / ".model.tmp", {"model.safetensors": b"\0"}),
    ]
    (out / f".metrics.jsonl.{dead}.tmp").write_text('{"step": 1')
    left.append(out / f".metrics.jsonl.{dead}.tmp")
    kept = [out / f".summary.json.{live_pid}.tmp", out / ".notes.tmp", out / "mine.tmp"]  # a live writer's, others'
    for path in kept:
        path.write_text("x")

    capsys.readouterr()
    engine.train(validated(tiny_recipe(tiny_model_dir, pairs_file, out)), show_progress=False)
    said = capsys.readouterr().out
    for path in left:
        assert not path.exists(), path
        assert f"note: removed {path}, left by a write that did not finish" in said
    for path in kept:
        assert path.exists(), path
    assert said.count("note: removed") == len(left)


def test_an_old_copy_whose_writer_died_mid_swap_is_put_back(tmp_path):
    """``replace_dir`` moves the old folder aside, then renames the new one in: a writer killed between the two
    leaves the old copy as the only whole one."""
    dead = dead_pid()
    aside = folder_with(tmp_path / f".step-0000002.old-{dead}-0badcafe", {"state.json": b'{"step": 2}'})
    replaced = folder_with(tmp_path / f".step-0000004.old-{dead}-deadbeef", {"state.json": b'{"step": 4}'})
    folder_with(tmp_path / "step-0000004", {"state.json": b'{"step": 4}'})  # its new copy made it
    assert remove_stale_temps(tmp_path) == [replaced]
    assert not aside.exists() and json.loads((tmp_path / "step-0000002" / "state.json").read_text()) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000002", "step-0000004"]


def test_a_killed_cache_builders_temp_file_is_removed_by_the_next_build(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    pairs = TokenizedPairs(source="t", fingerprint="stale-temp", pairs=[TokenizedPair(0, (1, 5), (7, 2), (9, 2))])
    target = cache_path(cache_key("w", pairs, "float32/no"))
    stale = target.with_name(f".{target.name}.{dead_pid()}.tmp")
    stale.write_bytes(b"\0" * 100)  # a builder killed mid-write
    cached_reference(LiveReference(tiny_model), pairs, weights="w", dtype="float32/no", batch_size=2, pad_id=2,
                     show_progress=False)
    assert sorted(p.name for p in (cache_root() / "reference").iterdir()) == [target.name, target.name + ".sha256"]


def test_staging_folders_and_temp_files_of_live_writers_are_kept(tmp_path, live_pid):
    ours = [folder_with(tmp_path / f".entry.building-{live_pid}-0123abcd", {}),
            folder_with(tmp_path / f".step-0000001.{os.getpid()}.tmp", {})]
    gone = folder_with(tmp_path / f".entry.building-{dead_pid()}-0123abcd", {})
    assert remove_stale_temps(tmp_path) == [gone]
    assert all(path.exists() for path in ours)
