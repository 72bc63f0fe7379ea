"""Recipe trees for tests: the tiny model on the small real-text pairs, quick to train."""

from __future__ import annotations

import copy
from pathlib import Path


def tiny_recipe(model_dir: Path, data_path: Path, out: Path, **sections) -> dict:
    """A recipe tree (before validation); ``sections`` are merged in one level deep."""
    tree = {
        "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_path), "max_length": 48, "max_prompt_length": 24},
        "loss": {"name": "dpo", "beta": 0.1},
        "train": {"batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3, "lr_scheduler": "constant",
                  "max_steps": 3},
        "eval": {"at_start": False, "task_metrics": False},
        "output": {"dir": str(out), "trackers": []},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **copy.deepcopy(value)}
        else:
            tree[key] = copy.deepcopy(value)
    return tree


def validated(tree: dict):
    from prefopt.registry.loading import default_plugins
    from prefopt.recipe import validate_tree

    return validate_tree(tree, default_plugins(), "test recipe")


def kill_after(tree: dict, recipe_path: Path, marker: Path, timeout: float = 240) -> None:
    """Start ``prefopt train`` on ``tree`` in a child process and SIGKILL it as soon as ``marker`` exists
    (e.g. a checkpoint directory): a crash at the worst moment, with nothing flushed or cleaned up."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    recipe_path.write_text(yaml.safe_dump(tree))
    process = subprocess.Popen(
        [sys.executable, "-m", "prefopt.cli", "train", str(recipe_path), "--no-progress"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from a run's metrics.jsonl."""
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}


def one_line_error(capsys, argv) -> str:
    """Run the CLI on ``argv``: it must exit 2 with exactly one line on stderr, no traceback."""
    from prefopt.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("prefopt: error: ")
    return err


def text_length_reward(prompts, completions) -> list[float]:
    """A judge function for tests: longer completion text scores higher (random tokens rarely tie on it)."""
    return [float(len(text)) for text in completions]


def online_tree(model_dir: Path, data_path: Path, out: Path, algorithm: dict, **sections) -> dict:
    """A recipe tree for an online algorithm on the tiny model: the transformers sampler, short completions,
    and the text-length judge (named as ``helpers:text_length_reward``, importable from tests/)."""
    spec = {
        "sampler": {"name": "transformers", "max_new_tokens": 6},
        "judge": {"name": "function", "function": "helpers:text_length_reward"},
        **algorithm,
    }
    train = {"max_steps": None, "save_every": 1, "keep_checkpoints": 100, **sections.pop("train", {})}
    return tiny_recipe(model_dir, data_path, out, algorithm=spec, train=train, **sections)


def train_tree(tree: dict) -> dict:
    """Validate a recipe tree and run it in this process (algorithms included); the run's summary."""
    from prefopt import engine

    return engine.run(validated(tree), show_progress=False)


def round_records(run_dir: Path) -> list[list[dict]]:
    """An on-policy run's rounds files, in order: one list of prompt records per round."""
    import json

    files = sorted((run_dir / "rounds").glob("round-*.jsonl"))
    return [[json.loads(line) for line in f.read_text().splitlines()] for f in files]


def metric_lines(run_dir: Path) -> list[dict]:
    """Every line of a run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}



def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) imported as a module, e.g. ``load_benchmark("trl_speed")``."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
