"""Building cache entries (staging directories, atomic publication, cleanup after a killed builder) and atomic
writes of single files and whole directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prefopt.paths import (
    atomic_file,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    publish,
    replace_dir,
    staging_dir,
)


def _complete(directory):
    return (directory / "done").is_file()


def test_a_second_publisher_keeps_the_first_finished_copy(tmp_path):
    target = tmp_path / "entry"
    first, second = staging_dir(target, "building"), staging_dir(target, "building")
    for staging, text in ((first, "first"), (second, "second")):
        (staging / "done").write_text(text)
    publish(first, target, _complete)
    publish(second, target, _complete)  # lost the race: no error, the winner's files stay
    assert (target / "done").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no staging directory left behind


def test_staging_directories_of_dead_builders_are_removed(tmp_path):
    target = tmp_path / "entry"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".entry.building-{dead.stdout.strip()}-deadbeef"  # a builder that was killed
    stale.mkdir()
    live = staging_dir(target, "building")
    assert not stale.exists()
    assert live.is_dir() and live.name.startswith(".entry.building-")


def test_atomic_writes_replace_the_target_and_leave_no_temporary_file(tmp_path):
    target = tmp_path / "new" / "out.json"  # the parent is created
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == json.dumps({"b": 1, "a": [1, 2]}, indent=1) + "\n"
    atomic_write_text(target, "héllo")
    assert target.read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and str(os.getpid()) in tmp.name
        tmp.write_text("half")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_replace_dir_swaps_a_full_directory_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale").write_text("from the old build")
    staging = staging_dir(target, "building")
    (staging / "weights").write_text("new")
    replace_dir(staging, target)
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # neither the staging nor the old copy left
