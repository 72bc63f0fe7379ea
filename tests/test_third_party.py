"""A third-party plugin, installed for real, found by its entry point, validated and trained with.

``tests/example_plugin/`` is a complete plugin package as a user writes it (a pyproject.toml and one
module with the SLiC/RSO hinge loss). It is pip-installed into a temporary ``--target`` directory, never
into the venv, and every ``prefopt`` command runs in a subprocess whose PYTHONPATH holds that directory,
so the plugin is discovered only through its ``[project.entry-points.prefopt]`` line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

EXAMPLE_PLUGIN = Path(__file__).resolve().parent / "example_plugin"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """pip install --target <tmp> of a copy of tests/example_plugin (the build writes build/ and
    *.egg-info next to the sources, so it builds from a copy and leaves the checkout clean)."""
    source = tmp_path_factory.mktemp("example-plugin-src")
    shutil.copytree(EXAMPLE_PLUGIN, source, dirs_exist_ok=True, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = tmp_path_factory.mktemp("example-plugin-site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input",
         "--disable-pip-version-check", "--quiet", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    assert (site / "prefopt_hinge.py").is_file()
    return site


def prefopt(site: Path, *args: str, cwd: Path, timeout: int = 60) -> subprocess.CompletedProcess:
    """Run `prefopt ARGS` in a fresh interpreter that sees the plugin only through PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFOPT_DISABLE_PLUGIN_AUTOLOAD", "PREFOPT_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "prefopt.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def output_of(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"


def hinge_recipe(path: Path, model_dir: Path, pairs_file: Path, run_dir: Path) -> Path:
    recipe = {
        "model": {"path": str(model_dir)},
        "data": {"path": str(pairs_file), "max_length": 64, "max_prompt_length": 32},
        "loss": {"name": "hinge", "beta": 0.2},
        "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 2},
        "eval": {"at_start": False},
        "output": {"dir": str(run_dir), "trackers": []},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_example_plugin_is_listed_with_its_package(plugin_site, tmp_path):
    """`prefopt list loss` shows the hinge loss, provided by `prefopt-hinge-example 0.1.0`, beside the built-in
    dpo; `prefopt show loss hinge` its option."""
    done = prefopt(plugin_site, "list", "loss", cwd=tmp_path)
    assert done.returncode == 0, output_of(done)
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ")}
    assert "hinge" in rows, output_of(done)
    assert "[prefopt-hinge-example 0.1.0]" in rows["hinge"]  # a plugin from another package names it
    assert "arXiv:2309.06657" in rows["hinge"]
    assert "dpo" in rows  # the built-in is still there: both came through the same door
    shown = prefopt(plugin_site, "show", "loss", "hinge", cwd=tmp_path)
    assert shown.returncode == 0, output_of(shown)
    assert "  beta: float = 0.1  (> 0)\n" in shown.stdout


def test_validate_accepts_the_plugin_loss_and_suggests_it_for_a_typo(
    plugin_site, tmp_path, tiny_model_dir, pairs_file
):
    """loss.name: hinge (beta 0.2) validates; loss.name=hinj fails with exit 2 and "did you mean 'hinge'"."""
    recipe = hinge_recipe(tmp_path / "hinge.yaml", tiny_model_dir, pairs_file, tmp_path / "run")

    ok = prefopt(plugin_site, "validate", str(recipe), cwd=tmp_path)
    assert ok.returncode == 0, output_of(ok)
    assert "ok" in ok.stdout

    typo = prefopt(plugin_site, "validate", str(recipe), "loss.name=hinj", cwd=tmp_path)
    assert typo.returncode == 2, output_of(typo)
    assert "'hinj'" in typo.stderr and "did you mean 'hinge'" in typo.stderr, output_of(typo)
    assert "Traceback" not in typo.stderr


def test_train_with_the_plugin_loss(plugin_site, tmp_path, tiny_model_dir, pairs_file):
    """Two optimizer steps (4 pairs each, 2 per micro-batch) with the hinge loss on the tiny model.

    The first step's loss is computed before any update, when the policy equals the reference: every
    margin is 0, so the hinge loss is relu(1 - 0.2 * 0) = 1 exactly (DPO would give log 2 = 0.693).
    Float32 forwards batched differently for the reference cache leave ~1e-6 of noise: tolerance 1e-3.
    """
    run_dir = tmp_path / "run"
    recipe = hinge_recipe(tmp_path / "hinge.yaml", tiny_model_dir, pairs_file, run_dir)

    done = prefopt(plugin_site, "train", str(recipe), "--no-progress", cwd=tmp_path, timeout=240)
    assert done.returncode == 0, output_of(done)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]  # training lines; held-out lines use eval/ keys
    assert [r["step"] for r in steps] == [1, 2], records
    assert all(math.isfinite(r["loss"]) for r in steps), steps
    assert steps[0]["loss"] == pytest.approx(1.0, abs=1e-3)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-3)
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2  # the tiny model, saved in Hugging Face format
