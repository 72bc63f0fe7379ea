"""What a user sees: one line naming what and where for a wrong recipe or data (exit 2); --version and a
--help that answer without torch; list and show read from the plugin catalogue; init; bench --check."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import yaml

from helpers import one_line_error
from prefopt.cli import main


@pytest.fixture()
def recipe_file(tmp_path, tiny_model_dir, pairs_file):
    def write(**data_overrides) -> str:
        tree = {
            "model": {"path": str(tiny_model_dir)},
            "data": {"path": str(pairs_file), "max_length": 32, "max_prompt_length": None, **data_overrides},
            "loss": {"name": "dpo", "beta": 0.1},
            "train": {"max_steps": 1, "batch_size": 4},
            "output": {"dir": str(tmp_path / "run"), "trackers": []},
        }
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(tree))
        return str(path)

    return write


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_unknown_key_names_its_path_and_the_closest_key(capsys, recipe_file):
    err = one_line_error(capsys, ["validate", recipe_file(), "train.learning_rat=1e-5"])
    assert "train.learning_rat: unknown key (did you mean 'learning_rate'?)" in err


def test_bad_type_names_the_key_and_the_value(capsys, recipe_file):
    err = one_line_error(capsys, ["validate", recipe_file(), "train.batch_size=eight"])
    assert "train.batch_size" in err and "'eight'" in err


def test_unknown_loss_name_suggests_the_closest(capsys, recipe_file):
    err = one_line_error(capsys, ["train", recipe_file(), "loss.name=dpoo"])
    assert "loss.name: unknown loss 'dpoo' (did you mean 'dpo'" in err


def test_missing_column_names_the_file_the_column_and_the_fix(capsys, recipe_file, tmp_path):
    data = _write_jsonl(tmp_path / "renamed.jsonl", [{"prompt": "a", "good": "b", "rejected": "c"}] * 4)
    err = one_line_error(capsys, ["train", recipe_file(path=data), "--no-progress"])
    assert "renamed.jsonl" in err and "'chosen'" in err and "data.columns.chosen" in err


def test_empty_file_is_named(capsys, recipe_file, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = one_line_error(capsys, ["train", recipe_file(path=str(empty)), "--no-progress"])
    assert "empty.jsonl" in err and "empty" in err


def test_prompt_longer_than_max_length_names_the_row_and_the_fixes(capsys, recipe_file, tmp_path):
    rows = [{"prompt": "fine", "chosen": " yes", "rejected": " no"}] * 3
    rows.insert(2, {"prompt": "word " * 100, "chosen": " yes", "rejected": " no"})
    data = _write_jsonl(tmp_path / "long.jsonl", rows)
    err = one_line_error(capsys, ["train", recipe_file(path=data), "--no-progress"])
    assert "long.jsonl" in err and "row 2" in err and "max_length" in err and "invalid_rows=skip" in err


def test_several_recipe_problems_are_reported_together(capsys, recipe_file):
    assert main(["validate", recipe_file(), "loss.beta=-1", "train.epochs=0", "model.dtpye=float32"]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err
    assert "loss.beta" in err and "train.epochs" in err and "model.dtpye" in err


def test_validate_accepts_a_good_recipe(capsys, recipe_file):
    assert main(["validate", recipe_file()]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")


# ----------------------------------------------------------------------------------------------------------
# --version, --help: answered without importing torch

COMMANDS = ["train", "validate", "list", "show", "init", "data", "extrapolate", "bench", "push"]


def run_python(code: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (sys.modules as a user's shell starts it)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def test_version_names_prefopt_torch_and_transformers(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"prefopt {importlib.metadata.version('prefopt')} (")
    assert f"torch {importlib.metadata.version('torch')}" in out
    assert f"transformers {importlib.metadata.version('transformers')}" in out


def test_help_and_version_import_no_torch():
    """--help of every command and --version: argparse and the standard library only (prefopt.cli imports
    each command's modules inside the command)."""
    done = run_python(f"""
        import contextlib, io, sys
        from prefopt.cli import main
        for argv in [["--help"], ["--version"], *[[c, "--help"] for c in {COMMANDS!r}]]:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    main(argv)
                except SystemExit as exit:
                    assert exit.code == 0, argv
            assert out.getvalue().strip(), argv
        heavy = sorted(m for m in ("torch", "transformers", "datasets", "accelerate", "pydantic", "prefopt_plugins")
                       if m in sys.modules)
        print(heavy)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------------------
# list and show


def plugin_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("  ")]


def test_list_groups_every_plugin_by_kind_in_100_columns(capsys):
    from prefopt.registry.kinds import KINDS
    from prefopt.registry.loading import load_plugins

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100
    headers = [line.split()[0] for line in lines if line and not line.startswith(" ") and "(" in line]
    assert headers == [kind.name for kind in KINDS]
    plugins = load_plugins()
    names = [line.split()[0] for line in plugin_lines(out)]
    assert names == [name for kind in KINDS for name in plugins.registry(kind).names()]
    (dpo,) = [line for line in plugin_lines(out) if line.split()[0] == "dpo"]
    assert dpo.split()[1] == "arXiv:2305.18290"
    assert "Direct Preference Optimization" in dpo
    assert lines[-1].startswith("prefopt show KIND NAME")


@pytest.mark.parametrize("word", ["judge", "judges", "Judges"])
def test_list_one_kind_singular_or_plural(capsys, word):
    assert main(["list", word]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("judge (")
    assert {line.split()[0] for line in plugin_lines(out)} >= {"function", "llm_pairwise", "reward_model"}
    assert "dpo" not in {line.split()[0] for line in plugin_lines(out)}


def test_list_unknown_kind_suggests_the_closest(capsys):
    err = one_line_error(capsys, ["list", "losss"])
    assert "unknown kind 'losss' (did you mean 'loss'?)" in err and "recipe" in err


def test_show_prints_every_option_with_type_default_bounds_and_description(capsys):
    assert main(["show", "loss", "mrpo"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert out.startswith("loss mrpo\n")
    assert "arXiv:2405.16388" in out and f"prefopt {importlib.metadata.version('prefopt')}" in out
    assert "loss: {name: mrpo, ...}" in out
    assert "  clip: float | null = 0.1  (>= 0, < 1)\n" in out
    assert "  clip_rate: adaptive | fixed = adaptive\n" in out
    assert "  naive: bool = false\n" in out
    from prefopt_plugins.losses.mrpo import MRPO

    assert [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  ") and
            not line.startswith("   ") and ":" in line and line.split(":")[0].strip().isidentifier()
            and line.split(":")[0].strip() not in ("summary", "paper", "package", "recipe")] == list(
        MRPO.Config.model_fields)
    # the descriptions, wrapped: every word of one is there in order
    words = " ".join(MRPO.Config.model_fields["clip_rate"].description.split())
    assert words in " ".join(out.split())


def test_show_marks_a_required_option_and_a_nested_plugin_option(capsys):
    assert main(["show", "algorithm", "online_dpo"]) == 0
    out = capsys.readouterr().out
    assert "  rounds: int (required)  (>= 1, <= 100000)\n" in out
    assert "  sampler: mapping = {name: transformers}\n" in out
    assert "options (algorithm.OPTION):" in out


def test_show_unknown_plugin_suggests_the_closest(capsys):
    err = one_line_error(capsys, ["show", "loss", "simpoo"])
    assert "unknown loss 'simpoo' (did you mean 'simpo'" in err and "prefopt list loss" in err


# ----------------------------------------------------------------------------------------------------------
# the plugin catalogue: list and show read it; it is rebuilt whenever what is installed changes

HINGE_DIR = Path(__file__).resolve().parent / "example_plugin"


def catalogue_stamp() -> str:
    from prefopt.registry.catalogue import catalogue_path

    return json.loads(catalogue_path().read_text())["fingerprint"]


def test_a_catalogue_hit_imports_no_plugin_and_no_torch(tmp_path):
    """The first `prefopt list` builds the catalogue (loading the plugins); the next `list` and `show` read
    it and import neither torch nor any plugin module."""
    env = {"PREFOPT_CACHE": str(tmp_path / "cache")}
    for key in ("PREFOPT_PLUGINS", "PREFOPT_DISABLE_PLUGIN_AUTOLOAD"):
        env[key] = ""
    build = run_python("from prefopt.cli import main; main(['list'])", env)
    assert build.returncode == 0, build.stderr
    assert list((tmp_path / "cache" / "catalogue").glob("plugins-*.json"))
    hit = run_python("""
        import contextlib, io, sys
        from prefopt.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(["list"]) == 0 and main(["show", "loss", "dpo"]) == 0
        assert "beta: float = 0.1" in out.getvalue(), out.getvalue()
        plugins = [m for m in sys.modules if m.startswith("prefopt_plugins.") and m.count(".") > 1]
        print(sorted(m for m in [*sys.modules, *plugins] if m in ("torch", "pydantic") or m in plugins))
    """, env)
    assert hit.returncode == 0, hit.stderr
    assert hit.stdout.strip() == "[]"


def test_a_plugin_added_through_the_environment_rebuilds_the_catalogue(capsys, monkeypatch):
    monkeypatch.delenv("PREFOPT_PLUGINS", raising=False)
    monkeypatch.delenv("PREFOPT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.syspath_prepend(str(HINGE_DIR))
    assert main(["list", "loss"]) == 0
    before = catalogue_stamp()
    assert "hinge" not in {line.split()[0] for line in plugin_lines(capsys.readouterr().out)}

    monkeypatch.setenv("PREFOPT_PLUGINS", "prefopt_hinge")
    assert main(["list", "loss"]) == 0
    (hinge,) = [line for line in plugin_lines(capsys.readouterr().out) if line.split()[0] == "hinge"]
    assert "arXiv:2309.06657" in hinge and "[module prefopt_hinge]" in hinge  # not prefopt's own: named
    assert catalogue_stamp() != before
    assert main(["show", "loss", "hinge"]) == 0
    assert "  beta: float = 0.1  (> 0)\n" in capsys.readouterr().out


def test_an_edited_plugin_module_rebuilds_the_catalogue(capsys, monkeypatch, tmp_path):
    """The stamp holds each plugin file's size and modification time: an edit shows at once."""
    source = (HINGE_DIR / "prefopt_hinge.py").read_text()
    module = tmp_path / "edited_hinge.py"
    module.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PREFOPT_PLUGINS", "edited_hinge")
    assert main(["show", "loss", "hinge"]) == 0
    assert "beta: float = 0.1" in capsys.readouterr().out

    module.write_text(source.replace("Field(0.1, gt=0", "Field(0.25, gt=0"))
    sys.modules.pop("edited_hinge", None)  # the rebuild imports the edited file, as a new process would
    assert main(["show", "loss", "hinge"]) == 0
    assert "beta: float = 0.25" in capsys.readouterr().out
    sys.modules.pop("edited_hinge", None)


@pytest.mark.parametrize("damage", ["not json {", "[]", "truncate", "wrong types"])
def test_a_damaged_catalogue_is_rebuilt_not_trusted(capsys, damage):
    from prefopt.registry.catalogue import catalogue_path

    assert main(["list"]) == 0
    good = capsys.readouterr().out
    path = catalogue_path()
    original = path.read_text()
    if damage == "truncate":
        path.write_text(original[: len(original) // 2])
    elif damage == "wrong types":  # the right stamp, so only checking each field catches it
        data = json.loads(original)
        data["entries"][0]["options"] = "beta"
        data["entries"][1]["summary"] = 7
        path.write_text(json.dumps(data))
    else:
        path.write_text(damage)
    assert main(["list"]) == 0
    assert capsys.readouterr().out == good
    assert json.loads(path.read_text()) == json.loads(original)  # rebuilt, and written again


def test_fingerprint_finds_plugin_files_without_importing_them():
    done = run_python("""
        import sys
        from prefopt.registry.catalogue import fingerprint
        fingerprint()
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("prefopt_plugins.")
                     and m.count(".") > 1))
    """, {"PREFOPT_PLUGINS": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # parent packages (prefopt_plugins.losses) only


# ----------------------------------------------------------------------------------------------------------
# example recipes: list recipe, show recipe, init (prefopt.recipe.examples, here a stand-in with its interface)


@pytest.fixture()
def examples(monkeypatch):
    import prefopt.recipe
    from prefopt.errors import PrefoptError, did_you_mean

    shipped = {"dpo": "# DPO on the embedded default\nloss: {name: dpo}\n",
               "bench/smoke": "# A few-minute check of the bench\nbase: dpo.yaml\n",
               "accelerate/ddp_cpu": "# DDP over gloo\nnum_processes: 2\n"}
    written = []

    def text(name):
        if name not in shipped:
            raise PrefoptError(f"no example recipe named {name!r}{did_you_mean(name, shipped)}")
        return shipped[name]

    def write(name, folder, *, overwrite=False):
        written.append((name, overwrite))
        path = Path(folder) / (name.rsplit("/", 1)[-1] + ".yaml")
        path.write_text(text(name))
        return path

    stand_in = types.SimpleNamespace(names=lambda: list(shipped), text=text, write=write,
                                     describe=lambda name: text(name).splitlines()[0].lstrip("# "))
    monkeypatch.setattr(prefopt.recipe, "examples", stand_in, raising=False)
    return written


def test_list_recipe_names_and_describes_each_example(capsys, examples):
    assert main(["list", "recipes"]) == 0
    out = capsys.readouterr().out
    assert "  dpo                 DPO on the embedded default\n" in out
    assert "  bench/smoke         A few-minute check of the bench\n" in out
    assert out.splitlines()[0] == "recipe (3; prefopt init NAME writes one here)"


def test_show_recipe_prints_its_text(capsys, examples):
    assert main(["show", "recipe", "dpo"]) == 0
    assert capsys.readouterr().out == "# DPO on the embedded default\nloss: {name: dpo}\n"


def test_init_writes_the_example_here_and_says_how_to_run_it(capsys, examples, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "dpo.yaml").read_text().startswith("# DPO")
    assert out.splitlines() == ["wrote dpo.yaml", "check it: prefopt validate dpo.yaml",
                                "train it: prefopt train dpo.yaml"]
    assert main(["init", "bench/smoke", "--force"]) == 0
    assert "prefopt bench smoke.yaml --check" in capsys.readouterr().out
    assert main(["init", "accelerate/ddp_cpu"]) == 0
    assert "accelerate launch --config_file ddp_cpu.yaml -m prefopt.cli train RECIPE.yaml" in capsys.readouterr().out
    assert examples == [("dpo", False), ("bench/smoke", True), ("accelerate/ddp_cpu", False)]


def test_init_unknown_example_suggests_the_closest(capsys, examples, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["init", "dpoo"])
    assert "no example recipe named 'dpoo' (did you mean 'dpo'?)" in err
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------
# bench --check: every entry x seed validated, nothing trained


def write_bench(folder: Path, model_dir: Path, pairs_file: Path, entries: list[dict]) -> Path:
    base = {"model": {"path": str(model_dir)},
            "data": {"path": str(pairs_file), "max_length": 32, "max_prompt_length": 16},
            "loss": {"name": "dpo"}, "train": {"max_steps": 1, "batch_size": 4}, "output": {"trackers": []}}
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    bench = {"base": "base.yaml", "seeds": [0, 1], "entries": entries, "output": {"dir": str(folder / "out")}}
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(bench))
    return path


def test_bench_check_validates_every_run_and_trains_nothing(capsys, tmp_path, tiny_model_dir, pairs_file):
    path = write_bench(tmp_path, tiny_model_dir, pairs_file,
                       [{"name": "dpo"}, {"name": "ipo", "overrides": ["loss.name=ipo"]}])
    assert main(["bench", str(path), "--check"]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: ok (bench recipe: 2 entries x 2 seeds = 4 runs)"
    assert not (tmp_path / "out").exists()


def test_bench_check_names_the_entry_of_a_bad_override(capsys, tmp_path, tiny_model_dir, pairs_file):
    path = write_bench(tmp_path, tiny_model_dir, pairs_file,
                       [{"name": "dpo"}, {"name": "typo", "overrides": ["loss.name=dpoo"]}])
    err = one_line_error(capsys, ["bench", str(path), "--check"])
    assert "'typo'" in err and "unknown loss 'dpoo'" in err
    assert not (tmp_path / "out").exists()


def test_the_catalogue_reads_the_names_plugin_loading_reads():
    """The catalogue repeats three names of prefopt.registry.loading (importing that imports torch)."""
    from prefopt.registry import catalogue, loading

    assert (catalogue.GROUP, catalogue.AUTOLOAD_OFF_ENV, catalogue.EXTRA_PLUGINS_ENV) == (
        loading.GROUP, loading.AUTOLOAD_OFF_ENV, loading.EXTRA_PLUGINS_ENV)
