"""A third-party algorithm, installed for real, found by its entry point, validated and run by name.

``tests/example_algorithm/`` is a complete algorithm package as a user writes it (a pyproject.toml and one
module: a short-to-long curriculum written against ``prefopt.Phase``). As for the loss example
(``test_third_party.py``), it is pip-installed into a temporary ``--target`` directory, never into the venv,
and every ``prefopt`` command runs in a subprocess that sees it only through PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

EXAMPLE_ALGORITHM = Path(__file__).resolve().parent / "example_algorithm"


@pytest.fixture(scope="module")
def algorithm_site(tmp_path_factory) -> Path:
    """pip install --target <tmp> of a copy of tests/example_algorithm (built from a copy, so the build's
    build/ and *.egg-info stay out of the checkout)."""
    source = tmp_path_factory.mktemp("example-algorithm-src")
    shutil.copytree(EXAMPLE_ALGORITHM, source, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path_factory.mktemp("example-algorithm-site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input",
         "--disable-pip-version-check", "--quiet", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    assert (site / "prefopt_curriculum.py").is_file()
    return site


def prefopt(site: Path, *args: str, cwd: Path, timeout: int = 60) -> subprocess.CompletedProcess:
    """Run `prefopt ARGS` in a fresh interpreter that sees the plugin only through PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFOPT_DISABLE_PLUGIN_AUTOLOAD", "PREFOPT_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "prefopt.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def output_of(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"


def curriculum_recipe(path: Path, model_dir: Path, pairs_file: Path, run_dir: Path) -> Path:
    recipe = {
        "model": {"path": str(model_dir)},
        "data": {"path": str(pairs_file), "max_length": 64, "max_prompt_length": 32},
        "loss": {"name": "dpo", "beta": 0.1},
        "algorithm": {"name": "curriculum"},
        "train": {"max_steps": None, "epochs": 1, "batch_size": 4, "micro_batch_size": 2},
        "eval": {"at_start": False},
        "output": {"dir": str(run_dir), "trackers": []},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_example_algorithm_is_listed_and_validated_by_name(algorithm_site, tmp_path, tiny_model_dir, pairs_file):
    """`prefopt list` shows it with its package; a recipe naming it validates, a misspelt option does not."""
    listed = prefopt(algorithm_site, "list", "algorithm", cwd=tmp_path)
    assert listed.returncode == 0, output_of(listed)
    rows = [line for line in listed.stdout.splitlines() if line.split()[:1] == ["curriculum"]]
    assert rows and "[prefopt-curriculum-example 0.1.0]" in rows[0], output_of(listed)

    recipe = curriculum_recipe(tmp_path / "curriculum.yaml", tiny_model_dir, pairs_file, tmp_path / "run")
    ok = prefopt(algorithm_site, "validate", str(recipe), cwd=tmp_path)
    assert ok.returncode == 0, output_of(ok)
    typo = prefopt(algorithm_site, "validate", str(recipe), "algorithm.longest_frist=true", cwd=tmp_path)
    assert typo.returncode == 2, output_of(typo)
    assert "did you mean 'longest_first'" in typo.stderr and "Traceback" not in typo.stderr, output_of(typo)


def test_train_with_the_example_algorithm(algorithm_site, tmp_path, tiny_model_dir, pairs_file):
    """One epoch of 12 pairs in batches of 4: three steps, whose pairs get longer step by step; the phase's
    metric is logged before each step, and the summary names the algorithm."""
    run_dir = tmp_path / "run"
    recipe = curriculum_recipe(tmp_path / "curriculum.yaml", tiny_model_dir, pairs_file, run_dir)
    done = prefopt(algorithm_site, "train", str(recipe), "--no-progress", cwd=tmp_path, timeout=240)
    assert done.returncode == 0, output_of(done)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    lengths = {r["step"]: r["curriculum/tokens"] for r in records if r.get("before_step")}
    assert list(lengths) == [0, 1, 2]  # measured before steps 1, 2 and 3
    assert lengths[0] < lengths[1] < lengths[2], lengths
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == "curriculum" and summary["steps"] == 3
