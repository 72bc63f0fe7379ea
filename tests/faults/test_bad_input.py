"""Bad input a user can fix ends in one line naming the file, row or key and the fix: exit status 2, no traceback.

Each case is first made real (a file with a Latin-1 byte, a model folder without its tokenizer, ...), then run
through the command line as a user would, and nothing may have been trained or written from it.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PAIRS
from helpers import one_line_error, tiny_recipe
from prefopt.cli import main


def write_recipe(tmp_path: Path, model: Path | str, data: Path | str) -> Path:
    path = tmp_path / "recipe.yaml"
    tree = tiny_recipe(model, data, tmp_path / "run", train={"max_steps": 2})
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def pair_lines() -> list[bytes]:
    return [json.dumps({"prompt": p, "chosen": c, "rejected": r}).encode() + b"\n" for p, c, r in PAIRS]


def with_latin1_byte(lines: list[bytes], index: int) -> list[bytes]:
    """``lines`` with the ``index``-th one's first value (a JSON line's or a CSV row's) starting with Latin-1
    'é' (byte 0xe9), which is not UTF-8."""
    changed = list(lines)
    line = changed[index]
    changed[index] = line.replace(b'": "', b'": "\xe9', 1) if line.startswith(b"{") else b'"\xe9' + line[1:]
    return changed


def assert_nothing_trained(tmp_path: Path) -> None:
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "model").exists()


# ----------------------------------------------------------------------------------------------------------
# data files


def test_jsonl_that_is_not_utf8_is_named_by_file_and_line(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b"".join(with_latin1_byte(pair_lines(), 3)))
    err = one_line_error(capsys, ["train", str(write_recipe(tmp_path, tiny_model_dir, data)), "--no-progress"])
    assert err == f"prefopt: error: {data} line 4: not UTF-8 text (byte 0xe9); save the file as UTF-8"
    assert_nothing_trained(tmp_path)


def test_csv_and_compressed_files_that_are_not_utf8_are_named_by_line(capsys, tmp_path, tiny_model_dir):
    import gzip

    csv = tmp_path / "latin1.csv"
    rows = [b"prompt,chosen,rejected\n"] + [f'"{p}","{c}","{r}"\n'.encode() for p, c, r in PAIRS]
    csv.write_bytes(b"".join(with_latin1_byte(rows, 5)))
    # the CSV reader fails as it decodes, and datasets logs that first: the log must not be a second line
    err = one_line_error(capsys, ["train", str(write_recipe(tmp_path, tiny_model_dir, csv)), "--no-progress"])
    assert err == f"prefopt: error: {csv} line 6: not UTF-8 text (byte 0xe9); save the file as UTF-8"

    packed = tmp_path / "latin1.jsonl.gz"
    packed.write_bytes(gzip.compress(b"".join(with_latin1_byte(pair_lines(), 7))))
    err = one_line_error(capsys, ["train", str(write_recipe(tmp_path, tiny_model_dir, packed)), "--no-progress"])
    assert err == f"prefopt: error: {packed} line 8: not UTF-8 text (byte 0xe9); save the file as UTF-8"
    assert_nothing_trained(tmp_path)


def test_a_directory_names_the_file_that_is_not_utf8(capsys, tmp_path, tiny_model_dir):
    folder = tmp_path / "prefs"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(b"".join(pair_lines()))
    (folder / "test.jsonl").write_bytes(b"".join(with_latin1_byte(pair_lines()[:4], 1)))
    recipe = write_recipe(tmp_path, tiny_model_dir, folder)
    err = one_line_error(capsys, ["train", str(recipe), "data.eval_split=test", "--no-progress"])
    assert err == f"prefopt: error: {folder / 'test.jsonl'} line 2: not UTF-8 text (byte 0xe9); save the file as UTF-8"


def test_parquet_that_is_not_utf8_is_named_by_row_and_column(capsys, tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chosen = [c.encode() for _, c, _ in PAIRS]
    chosen[6] = b" caf\xe9"
    table = pa.table({"prompt": [p for p, _, _ in PAIRS], "rejected": [r for _, _, r in PAIRS],
                      # bytes viewed as strings: pyarrow does not validate them, as its JSON reader does not
                      "chosen": pa.array(chosen, pa.binary()).view(pa.string())})
    data = tmp_path / "latin1.parquet"
    pq.write_table(table, data)
    err = one_line_error(capsys, ["train", str(write_recipe(tmp_path, tiny_model_dir, data)), "--no-progress"])
    assert err == (f"prefopt: error: {data} (split train) row 6, column 'chosen': not UTF-8 text; "
                   "save the data as UTF-8")


@pytest.fixture()
def deny_reading(monkeypatch):
    """Make a file unreadable: chmod 000, and where that stops nobody (root reads anything), the refusal the
    OS would give, raised by open() for that one path."""

    def deny(path: Path) -> None:
        path.chmod(0)
        if os.geteuid() != 0:
            return
        real_open = builtins.open

        def refusing_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)) == str(path):
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
        monkeypatch.setattr(io, "open", refusing_open)  # pathlib opens through io.open

    yield deny


def test_an_unreadable_data_file_says_permission_denied(capsys, tmp_path, tiny_model_dir, deny_reading):
    data = tmp_path / "locked.jsonl"
    data.write_bytes(b"".join(pair_lines()))
    recipe = write_recipe(tmp_path, tiny_model_dir, data)
    deny_reading(data)
    err = one_line_error(capsys, ["train", str(recipe), "--no-progress"])
    assert err == f"prefopt: error: {data}: permission denied; make the file readable (chmod u+r {data})"
    assert "valid json" not in err
    assert_nothing_trained(tmp_path)


def test_an_unreadable_recipe_says_permission_denied(capsys, tmp_path, tiny_model_dir, pairs_file, deny_reading):
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs_file)
    deny_reading(recipe)
    err = one_line_error(capsys, ["validate", str(recipe)])
    assert err == f"prefopt: error: recipe {recipe}: permission denied; make the file readable (chmod u+r {recipe})"


def test_a_recipe_that_is_not_utf8_is_named_by_line(capsys, tmp_path, tiny_model_dir, pairs_file):
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs_file)
    recipe.write_bytes(recipe.read_bytes() + b"# r\xe9sum\xe9\n")
    line = recipe.read_bytes().count(b"\n")
    err = one_line_error(capsys, ["validate", str(recipe)])
    assert err == f"prefopt: error: recipe {recipe} line {line}: not UTF-8 text (byte 0xe9); save the file as UTF-8"


# ----------------------------------------------------------------------------------------------------------
# model folders


def test_a_model_folder_without_a_tokenizer_says_so(capsys, tmp_path, tiny_model_dir, pairs_file):
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    err = one_line_error(capsys, ["train", str(write_recipe(tmp_path, bare, pairs_file)), "--no-progress"])
    assert err == (f"prefopt: error: model.path '{bare}': the folder has no tokenizer files (tokenizer.json, "
                   f"tokenizer.model, vocab.json, ...); save the model's tokenizer there with "
                   f"tokenizer.save_pretrained('{bare}')")
    assert_nothing_trained(tmp_path)


def test_a_local_model_path_that_does_not_exist_says_no_such_folder(capsys, tmp_path, pairs_file, monkeypatch):
    missing = tmp_path / "models" / "mine"
    err = one_line_error(capsys, ["train", str(write_recipe(tmp_path, missing, pairs_file)), "--no-progress"])
    assert err == f"prefopt: error: model.path '{missing}': no such folder; check model.path"
    assert "Repo id" not in err

    monkeypatch.chdir(tmp_path)  # a relative path: the message says where relative paths start
    err = one_line_error(capsys, ["train", str(write_recipe(tmp_path, "./models/mine", pairs_file)), "--no-progress"])
    assert err == (f"prefopt: error: model.path './models/mine': no such folder; check model.path "
                   f"(relative paths start at the current directory, {tmp_path})")
    assert_nothing_trained(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# recipes: repeated keys, bench recipes


def test_a_key_set_twice_in_a_recipe_is_refused_naming_it_and_both_lines(capsys, tmp_path, tiny_model_dir,
                                                                        pairs_file):
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs_file)
    lines = recipe.read_text().splitlines()
    beta = next(i for i, line in enumerate(lines) if line.strip().startswith("beta:"))
    lines.insert(beta + 1, "  beta: 0.5")  # YAML alone would train with 0.5, the last one
    recipe.write_text("\n".join(lines) + "\n")
    for command in ("validate", "train"):
        err = one_line_error(capsys, [command, str(recipe)])
        assert err == (f"prefopt: error: recipe {recipe} line {beta + 2}: loss.beta is set twice (first on line "
                       f"{beta + 1}); YAML would keep only the last, so delete one")
    assert_nothing_trained(tmp_path)


def test_merge_keys_may_still_be_overridden(capsys, tmp_path, tiny_model_dir, pairs_file):
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs_file)
    tree = yaml.safe_load(recipe.read_text())
    del tree["loss"]
    # a key merged in with << and then set again is YAML's way to override, not a mistake
    recipe.write_text(yaml.safe_dump(tree, sort_keys=False) + "loss:\n  <<: {name: dpo, beta: 0.1}\n  beta: 0.3\n")
    assert main(["validate", str(recipe)]) == 0
    assert capsys.readouterr().out.strip() == f"{recipe}: ok"


@pytest.mark.parametrize("text", [
    "a: 1\nb: {a: 2}\n",  # the same key in two mappings
    "base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n",  # a merged key set again
    "1: one\n'1': the string one\n",  # an int and a str are two keys
    "list: [{n: 1}, {n: 2}]\n",
])
def test_the_recipe_loader_reads_what_safe_load_reads(text):
    from prefopt.recipe.unique_keys import safe_load_unique

    assert safe_load_unique(text) == yaml.safe_load(text)


def write_bench(tmp_path: Path, tiny_model_dir: Path, pairs_file: Path, entries: str) -> Path:
    write_recipe(tmp_path, tiny_model_dir, pairs_file)
    bench = tmp_path / "bench.yaml"
    bench.write_text(f"base: recipe.yaml\nseeds: [0, 1]\nentries:\n{entries}output:\n  dir: {tmp_path / 'bench'}\n")
    return bench


def test_validate_checks_a_bench_recipe_as_one(capsys, tmp_path, tiny_model_dir, pairs_file):
    entries = "  - {name: dpo}\n  - {name: strong, overrides: [loss.beta=0.5]}\n"
    bench = write_bench(tmp_path, tiny_model_dir, pairs_file, entries)
    assert main(["validate", str(bench)]) == 0
    assert capsys.readouterr().out.strip() == f"{bench}: ok (bench recipe: 2 entries x 2 seeds = 4 runs)"

    bench = write_bench(tmp_path, tiny_model_dir, pairs_file, "  - {name: typo, overrides: [loss.bta=0.5]}\n")
    err = one_line_error(capsys, ["validate", str(bench)])
    assert err == (f"prefopt: error: {bench}: entries[0] 'typo': loss.bta: unknown option of loss 'dpo' "
                   "(did you mean 'beta'?)")

    err = one_line_error(capsys, ["validate", str(bench), "loss.beta=0.2"])
    assert err == (f"prefopt: error: {bench} is a bench recipe, which takes no KEY=VALUE overrides; put them in "
                   "its overrides: list (every entry) or in an entry's overrides")
    assert not (tmp_path / "bench").exists()


def test_a_key_set_twice_in_a_bench_recipe_is_refused(capsys, tmp_path, tiny_model_dir, pairs_file):
    entries = "  - name: dpo\n    overrides: [loss.beta=0.2]\n    overrides: [loss.beta=0.5]\n"
    bench = write_bench(tmp_path, tiny_model_dir, pairs_file, entries)
    for argv in (["validate", str(bench)], ["bench", str(bench), "--no-progress"]):
        err = one_line_error(capsys, argv)
        assert err == (f"prefopt: error: recipe {bench} line 6: entries[0].overrides is set twice (first on line 5); "
                       "YAML would keep only the last, so delete one")
    assert not (tmp_path / "bench").exists()


# ----------------------------------------------------------------------------------------------------------
# the same, as a separate process


def test_the_command_line_prints_one_line_and_exits_2(tmp_path, tiny_model_dir):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b"".join(with_latin1_byte(pair_lines(), 0)))
    recipe = write_recipe(tmp_path, tiny_model_dir, data)
    done = subprocess.run([sys.executable, "-m", "prefopt.cli", "train", str(recipe), "--no-progress"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 2
    assert done.stderr == f"prefopt: error: {data} line 1: not UTF-8 text (byte 0xe9); save the file as UTF-8\n"
    assert_nothing_trained(tmp_path)
