"""A damaged cache is found before use and rebuilt: the reference cache (a bit flipped in its sums, a file cut
short, a file from before checksums) and the sentiment task's built data. A rebuilt reference cache gives the
losses of an undamaged run exactly."""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

import pytest

from conftest import PAIRS
from helpers import tiny_recipe, train_losses, validated
from prefopt import TaskContext, engine
from prefopt.integrity import MANIFEST_NAME, checksum_path, verify_checksum, verify_manifest
from prefopt.paths import cache_dir, cache_root


@pytest.fixture()
def private_cache(tmp_path, monkeypatch):
    """A cache of this test's own: the tests damage what is in it."""
    user_sdist = cache_root() / "assets" / "vaderSentiment-3.3.2.tar.gz"  # the session cache's, when it has one
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    if user_sdist.is_file():
        shutil.copy(user_sdist, cache_dir("assets") / user_sdist.name)
    return tmp_path / "cache"


def train(model_dir, data, out) -> dict:
    return engine.train(validated(tiny_recipe(model_dir, data, out)), show_progress=False)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_model_dir):
    """An undamaged run, once: (its run directory, its cache folder, the reference cache file's name).
    Module-scoped fixtures come before conftest's per-test cache, so this one sets its own."""
    root = tmp_path_factory.mktemp("clean")
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                                              for p, c, r in PAIRS))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFOPT_CACHE", str(root / "cache"))
        summary = train(tiny_model_dir, root / "pairs.jsonl", root / "run")
    cache = Path(summary["reference"]["caches"][0]["path"])
    assert verify_checksum(cache) is None
    return root / "run", root / "cache", cache.relative_to(root / "cache")


def tensor_bytes(path: Path, name: str) -> tuple[int, int]:
    """Where tensor ``name``'s data lies in a safetensors file: (first byte, end)."""
    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8 : 8 + header_size])[name]["data_offsets"]
    return 8 + header_size + start, 8 + header_size + end


def flip_bit(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def run_on_copy(clean_run, tiny_model_dir, tmp_path, capsys, damage=lambda cache: None) -> tuple[Path, str, dict]:
    """The clean run's cache copied into this test's own, ``damage`` done to the reference cache, then a run
    with the same recipe: (the cache file, what the run said, its summary)."""
    clean_dir, clean_cache, name = clean_run
    shutil.copytree(clean_cache, cache_root(), dirs_exist_ok=True)
    cache = cache_root() / name
    damage(cache)
    capsys.readouterr()
    summary = train(tiny_model_dir, clean_dir.parent / "pairs.jsonl", tmp_path / "run")
    return cache, capsys.readouterr().out, summary


def assert_rebuilt(clean_run, tmp_path, cache: Path, summary: dict) -> None:
    """Built again, whole, with its checksum, and giving exactly the undamaged run's losses."""
    assert summary["reference"]["caches"][0] == {"path": str(cache), "hit": False}
    assert verify_checksum(cache) is None
    assert train_losses(tmp_path / "run") == train_losses(clean_run[0])


def test_a_flipped_bit_in_the_sums_is_found_and_the_cache_rebuilt(clean_run, tiny_model_dir, tmp_path, capsys,
                                                                  private_cache):
    def flip_in_sums(cache):
        start, _ = tensor_bytes(cache, "sums")
        flip_bit(cache, start + 3)  # the low exponent bit of the first sum: it halves or doubles

    cache, said, summary = run_on_copy(clean_run, tiny_model_dir, tmp_path, capsys, flip_in_sums)
    line = f"reference cache {cache} is damaged (has a different sha256 than when it was written); rebuilding"
    assert said.count(line) == 1
    assert_rebuilt(clean_run, tmp_path, cache, summary)


def test_a_truncated_cache_is_rebuilt_without_a_traceback(clean_run, tiny_model_dir, tmp_path, capsys,
                                                          private_cache):
    def cut(cache):
        cache.write_bytes(cache.read_bytes()[:200])

    cache, said, summary = run_on_copy(clean_run, tiny_model_dir, tmp_path, capsys, cut)
    assert f"reference cache {cache} is damaged (has a different sha256 than when it was written); rebuilding" in said
    assert_rebuilt(clean_run, tmp_path, cache, summary)


def test_a_cache_without_a_checksum_is_rebuilt_not_trusted(clean_run, tiny_model_dir, tmp_path, capsys,
                                                           private_cache):
    def drop_checksum(cache):
        checksum_path(cache).unlink()

    cache, said, summary = run_on_copy(clean_run, tiny_model_dir, tmp_path, capsys, drop_checksum)
    assert f"reference cache {cache} cannot be checked (no checksum file {cache.name}.sha256); rebuilding" in said
    assert_rebuilt(clean_run, tmp_path, cache, summary)


def test_a_whole_cache_is_reused(clean_run, tiny_model_dir, tmp_path, capsys, private_cache):
    cache, said, summary = run_on_copy(clean_run, tiny_model_dir, tmp_path, capsys)
    assert summary["reference"]["caches"][0] == {"path": str(cache), "hit": True}
    assert "rebuilding" not in said
    assert train_losses(tmp_path / "run") == train_losses(clean_run[0])


# --- the sentiment task's built data

TINY_TASK = dict(num_train_prompts=12, num_eval_prompts=6, max_new_tokens=12, batch_size=16)


def build_task(tiny_model_dir, tokenizer, task_cache: Path, loads: list):
    from transformers import AutoModelForCausalLM

    from prefopt_plugins.tasks.sentiment import SentimentConfig, SentimentTask

    def load_model():
        loads.append(1)
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    ctx = TaskContext(model_id=str(tiny_model_dir), tokenizer=tokenizer, load_model=load_model,
                      cache_dir=task_cache, seed=0, show_progress=False)
    return SentimentTask(SentimentConfig(**TINY_TASK)).build(ctx)


def test_damaged_task_data_is_rebuilt_and_whole_data_reused(tiny_model_dir, tokenizer, tmp_path, private_cache,
                                                            caplog):
    loads = []
    data = build_task(tiny_model_dir, tokenizer, tmp_path / "tasks", loads)
    folder = data.train.parent
    assert loads == [1] and verify_manifest(folder) == []
    original = {p.name: p.read_bytes() for p in folder.iterdir()}

    build_task(tiny_model_dir, tokenizer, tmp_path / "tasks", loads)
    assert loads == [1], "whole data must be reused, not built again"

    flip_bit(data.train, 40, 0x20)  # a letter's case: still valid JSON, different text
    with caplog.at_level(logging.WARNING):
        build_task(tiny_model_dir, tokenizer, tmp_path / "tasks", loads)
    assert loads == [1, 1]
    assert (f"sentiment task data {folder} is damaged (train.jsonl has a different sha256 than when it was "
            "written); rebuilding") in caplog.text
    rebuilt = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(rebuilt) == set(original)
    for name in ("train.jsonl", "eval.jsonl", "eval_prompts.jsonl"):
        assert rebuilt[name] == original[name], name
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "no staging or old copy left"

    # a build from before manifests (task.json written last, no MANIFEST.json) is reused, its sums recorded
    (folder / MANIFEST_NAME).unlink()
    build_task(tiny_model_dir, tokenizer, tmp_path / "tasks", loads)
    assert loads == [1, 1] and verify_manifest(folder) == []


# --- files an algorithm reads back: stepwise's stages.json and the on-policy algorithms' round files


def test_a_round_file_is_checked_when_read_back(tmp_path):
    from prefopt.errors import PrefoptError
    from prefopt_plugins.algorithms.round_files import read_round, write_round

    path = tmp_path / "rounds" / "round-00002.jsonl"
    records = [{"row": 0, "prompt_ids": [1, 2], "chosen": 0, "rejected": 1}]
    write_round(path, records)
    assert verify_checksum(path) is None
    assert [json.loads(line) for line in read_round(path, 2, 8).splitlines()] == records
    flip_bit(path, 5)
    with pytest.raises(PrefoptError) as caught:
        read_round(path, 2, 8)
    assert str(caught.value) == (f"{path} is damaged (has a different sha256 than when it was written); to sample "
                                 "round 2 again, delete it and every checkpoint after step 8, or use a new output.dir")
    checksum_path(path).unlink()  # a round written before checksums were kept is read as it is
    assert read_round(path, 2, 8) == path.read_text()


def test_a_stage_plan_is_checked_when_read_back(tmp_path):
    from prefopt.errors import PrefoptError
    from prefopt_plugins.algorithms.stepwise import _read_plan, _write_plan

    path = tmp_path / "stages.json"
    assert _read_plan(path) is None
    plan = {"data": "f" * 64, "split": "random", "stages": [{"pairs": [0, 2]}, {"pairs": [1, 3]}]}
    _write_plan(path, plan)
    assert _read_plan(path) == plan
    path.write_text(path.read_text().replace("[\n    0,", "[\n    1,"))  # another valid plan, not the one written
    with pytest.raises(PrefoptError) as caught:
        _read_plan(path)
    assert str(caught.value) == (f"{path} is damaged (has a different sha256 than when it was written); delete it and "
                                 "stages.json.sha256 to split the data again (the same seed and data give the same "
                                 "split), or use a new output.dir")
    checksum_path(path).unlink()
    path.write_text('{"data": "f')  # no checksum (an older run's) and cut short
    with pytest.raises(PrefoptError, match=r"is damaged \(not JSON: JSONDecodeError\)"):
        _read_plan(path)
