"""load_rows: every kind of path reads the right split, and every failure is one line naming the path."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from prefopt.data import load_rows
from prefopt.data.load import looks_local
from prefopt.errors import PrefoptError

ROWS = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(3)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load_error(*args, **kwargs) -> str:
    """The message of the PrefoptError that load_rows raises; it must be a single line."""
    with pytest.raises(PrefoptError) as caught:
        load_rows(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- what loads ---------------------------------------------------------------------------------


def test_a_jsonl_file_is_the_train_split(tmp_path):
    rows = load_rows(str(write_jsonl(tmp_path / "prefs.jsonl", ROWS)), "train")
    assert rows.to_list() == ROWS


@pytest.mark.parametrize("suffix", [".json", ".parquet", ".csv", ".arrow", ".jsonl.gz"])
def test_every_supported_file_type_loads(tmp_path, suffix):
    path = tmp_path / f"prefs{suffix}"
    table = pa.Table.from_pylist(ROWS)
    if suffix == ".json":
        path.write_text(json.dumps(ROWS))  # one JSON array, not JSON Lines
    elif suffix == ".parquet":
        datasets.Dataset(table).to_parquet(str(path))
    elif suffix == ".csv":
        datasets.Dataset(table).to_csv(str(path), index=False)
    elif suffix == ".arrow":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        path.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in ROWS).encode()))
    assert load_rows(str(path), "train").to_list() == ROWS


def test_a_glob_joins_its_files_in_name_order(tmp_path):
    write_jsonl(tmp_path / "part-1.jsonl", ROWS[1:])
    write_jsonl(tmp_path / "part-0.jsonl", ROWS[:1])
    assert load_rows(str(tmp_path / "part-*.jsonl"), "train").to_list() == ROWS


def test_a_directory_gives_splits_by_file_name(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[:1])
    assert len(load_rows(str(tmp_path), "train")) == 3
    assert load_rows(str(tmp_path), "test").to_list() == ROWS[:1]


def test_a_split_slice_selects_rows(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    assert load_rows(str(tmp_path), "train[:2]").to_list() == ROWS[:2]


def test_save_to_disk_folders_load(tmp_path):
    dataset = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "dict"))
    dataset.save_to_disk(str(tmp_path / "single"))
    assert load_rows(str(tmp_path / "dict"), "test").to_list() == ROWS[:1]
    assert load_rows(str(tmp_path / "single"), "train").to_list() == ROWS


# --- what fails, and how it says so --------------------------------------------------------------


def test_a_missing_file_is_named(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    message = load_error(path, "train")
    assert path in message and "no such file" in message


def test_a_missing_relative_file_is_not_taken_for_a_hub_id():
    message = load_error("data/nope.jsonl", "train")
    assert "no such file" in message and "hub" not in message


@pytest.mark.parametrize("path", [
    "./model", "../data", "/abs/dir", "~/prefs", "runs/quickstart/model", "data\\train.jsonl",
    "prefs.jsonl", "train.parquet", "train.jsonl.gz", "someone/prefs.csv",
])
def test_paths_that_cannot_be_hub_ids_look_local(path):
    assert looks_local(path)


@pytest.mark.parametrize("path", ["HuggingFaceTB/SmolLM2-360M-Instruct", "smollm2-135m-instruct", "someone/preferences",
                                  "HuggingFaceTB/SmolLM2-1.7B", "gpt2"])
def test_hub_ids_do_not_look_local(path):
    assert not looks_local(path)


def test_an_unsupported_file_type_lists_the_supported_ones(tmp_path):
    path = tmp_path / "prefs.txt"
    path.write_text("hello\n")
    message = load_error(str(path), "train")
    assert str(path) in message and ".jsonl" in message and ".parquet" in message


def test_an_empty_file_is_named(tmp_path):
    path = tmp_path / "prefs.parquet"
    path.touch()
    message = load_error(str(path), "train")
    assert str(path) in message and "empty" in message


@pytest.mark.parametrize("name,text", [("blank.jsonl", "\n\n"), ("header.csv", "prompt,chosen,rejected\n")])
def test_a_file_without_rows_says_so(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    message = load_error(str(path), "train")
    assert str(path) in message and "no rows" in message


def test_invalid_json_names_the_file_and_the_parser_error(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p"}\nnot json\n')
    message = load_error(str(path), "train")
    assert str(path) in message and "could not read" in message and "JSON parse error" in message


def test_an_unknown_split_lists_the_available_ones(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS)
    message = load_error(str(tmp_path), "tset")
    assert str(tmp_path) in message and "'tset'" in message and "train, test" in message
    assert "did you mean 'test'" in message and "data.eval_split" in message


def test_a_single_file_has_only_the_train_split(tmp_path):
    path = str(write_jsonl(tmp_path / "prefs.jsonl", ROWS))
    message = load_error(path, "test")
    assert path in message and "available splits: train" in message


def test_a_glob_that_matches_nothing_is_named(tmp_path):
    pattern = str(tmp_path / "*.jsonl")
    assert pattern in load_error(pattern, "train")


def test_a_glob_over_mixed_file_types_is_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "b.parquet"))
    assert "different types" in load_error(str(tmp_path / "*"), "train")


def test_a_directory_without_data_files_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("not data")
    message = load_error(str(tmp_path), "train")
    assert str(tmp_path) in message and "no .json/.jsonl" in message


def test_an_unreachable_hub_suggests_a_local_path():
    # the session fixture puts the hub offline, which fails the way an unreachable hub does
    message = load_error("someone/preferences", "train")
    assert "someone/preferences" in message and "unreachable" in message and "local path" in message


def test_a_subset_on_a_local_file_is_refused(tmp_path):
    path = str(write_jsonl(tmp_path / "prefs.jsonl", ROWS))
    assert "data.subset" in load_error(path, "train", subset="default")
