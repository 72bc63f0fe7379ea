"""One writer at a time: a second run on an output.dir in use is refused naming the process that has it, a lock
left by a killed run is taken over with a note, and a second builder of a cache entry waits for the first and
reuses what it built."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from helpers import kill_after, metric_lines, tiny_recipe, validated
from prefopt import engine
from prefopt.data.types import TokenizedPair, TokenizedPairs
from prefopt.errors import PrefoptError
from prefopt.locks import RUN_LOCK_NAME, FileLock, Holder, lock_run_dir, release_run_dir
from prefopt.reference.cache import cache_key, cache_path, cached_reference
from prefopt.reference.providers import LiveReference

HOST = socket.gethostname()


def cli(recipe_path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prefopt.cli", "train", str(recipe_path), "--no-progress"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)


def wait_for(path, process, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not (path.exists() and path.read_text()) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert path.exists(), "the first run did not take its lock"


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_second_train_on_the_same_output_dir_is_refused_naming_the_pid(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    long_run = tiny_recipe(tiny_model_dir, pairs_file, out, train={"max_steps": None, "epochs": 10_000})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(long_run))
    first = cli(recipe_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(out / "recipe.yaml", first)  # written once the lock is taken
        assert json.loads((out / RUN_LOCK_NAME).read_text())["pid"] == first.pid
        recipe_before = (out / "recipe.yaml").read_text()
        second = cli(recipe_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = second.communicate(timeout=240)
        assert first.poll() is None, "the first run must still be running"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.strip() == (
        f"prefopt: error: output.dir {out} is in use by pid {first.pid} on host {HOST} (lock file "
        f"{out / RUN_LOCK_NAME}); wait for that run to end or stop it, or choose another output.dir"
    )
    assert (out / "recipe.yaml").read_text() == recipe_before
    steps = [(m["step"], tuple(sorted(m))) for m in metric_lines(out)] if (out / "metrics.jsonl").exists() else []
    assert len(steps) == len(set(steps)), "a metrics line was written twice"


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tiny_model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    tree = tiny_recipe(tiny_model_dir, pairs_file, out, train={"max_steps": None, "epochs": 10_000})
    kill_after(tree, tmp_path / "recipe.yaml", out / "recipe.yaml")  # written once the lock is taken
    killed = Holder.parse((out / RUN_LOCK_NAME).read_text())
    assert killed is not None and killed.alive() is False

    capsys.readouterr()
    engine.train(validated(tiny_recipe(tiny_model_dir, pairs_file, out)), show_progress=False)
    said = capsys.readouterr().out
    assert (f"note: output.dir {out} was locked by pid {killed.pid} on host {HOST}, which is no longer running; "
            "taking the lock over") in said
    assert (out / "summary.json").exists()
    assert not (out / RUN_LOCK_NAME).exists(), "the lock is released when the run ends"


def test_a_lock_file_naming_a_dead_pid_is_stale(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": HOST, "started": None}))
    said = []
    lock_run_dir(run_dir, said.append)
    try:
        assert len(said) == 1 and "which is no longer running; taking the lock over" in said[0]
        assert Holder.parse((run_dir / RUN_LOCK_NAME).read_text()) == Holder.me()
        lock_run_dir(run_dir, said.append)  # this process holds it already: kept, no second note
        assert len(said) == 1
    finally:
        release_run_dir(run_dir)
    assert not (run_dir / RUN_LOCK_NAME).exists()


def test_a_live_holder_named_by_the_file_refuses_even_without_flock(tmp_path):
    """Where a file system ignores flock, the file alone must still keep a second writer out."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        holder = Holder(sleeper.pid, HOST, None)
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / RUN_LOCK_NAME).write_text(json.dumps(vars(holder)))
        with pytest.raises(PrefoptError, match=f"is in use by pid {sleeper.pid} on host"):
            lock_run_dir(run_dir, print)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    """A pid that runs again, but started at another time than the lock's holder, is another process."""
    me = Holder.me()
    if me.started is None:
        pytest.skip("no /proc here: process start times cannot be read")
    assert Holder(me.pid, me.host, me.started).alive() is True
    assert Holder(me.pid, me.host, str(int(me.started) - 1)).alive() is False
    assert Holder(me.pid, "another-host", me.started).alive() is None


HOLD_AND_PUBLISH = """
import shutil, sys, time
from pathlib import Path
from prefopt.locks import build_lock
target, built = Path(sys.argv[1]), Path(sys.argv[2])
with build_lock(target):
    print("holding", flush=True)
    time.sleep(1.5)  # the second builder must wait through this
    shutil.copy(built.with_name(built.name + ".sha256"), target.with_name(target.name + ".sha256.part"))
    shutil.copy(built, target)
    Path(target.with_name(target.name + ".sha256.part")).rename(target.with_name(target.name + ".sha256"))
"""


def test_a_second_cache_builder_waits_and_reuses_the_first_ones_result(tiny_model, tmp_path, monkeypatch):
    pairs = TokenizedPairs(source="test", fingerprint="build-lock-test",
                           pairs=[TokenizedPair(i, (1, 5 + i), (7, 8, 2), (9, 2)) for i in range(3)])
    options = dict(weights="w", dtype="float32/no", batch_size=2, pad_id=2, show_progress=False)
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "elsewhere"))
    built, _ = cached_reference(LiveReference(tiny_model), pairs, **options)  # the first builder's result
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "shared"))
    target = cache_path(cache_key("w", pairs, "float32/no"))

    first = subprocess.Popen([sys.executable, "-c", HOLD_AND_PUBLISH, str(target), str(built.path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding"
        live, said = LiveReference(tiny_model), []
        cached, hit = cached_reference(live, pairs, **options, say=said.append)
    finally:
        first.wait(timeout=60)
    assert said == [f"waiting for pid {first.pid} on host {HOST}, which is building {target}"]
    assert hit and live.forward_passes == 0, "the second builder must reuse the first one's cache, not build"
    assert cached.path == target and target.read_bytes() == built.path.read_bytes()
    assert not target.with_name(target.name + ".lock").exists()


def test_a_released_lock_file_is_gone_and_can_be_taken_again(tmp_path):
    first, second = FileLock(tmp_path / "x.lock"), FileLock(tmp_path / "x.lock")
    assert first.acquire(wait=False) == (True, None)
    taken, holder = second.acquire(wait=False)
    assert not taken and holder == Holder.me()
    first.release()
    assert not (tmp_path / "x.lock").exists()
    assert second.acquire(wait=False) == (True, None)
    second.release()
