"""Distributed training on CPU: `prefopt train` in 2 gloo processes, launched by accelerate with
recipes/accelerate/ddp_cpu.yaml, trains exactly as 1 process does on the same global batch, and its
checkpoint resumes in 1 process. Every subprocess has a timeout, so a deadlock fails instead of hanging."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PAIRS, write_jsonl
from helpers import tiny_recipe, validated
from prefopt import engine
from prefopt.cli import main

CONFIGS = Path(__file__).parent.parent / "recipes" / "accelerate"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TIMEOUT = 240  # seconds for one launch; the 2-process run takes ~15 s on 2 cores
# 12 pairs in batches of 4: 3 steps an epoch, 6 steps cross an epoch boundary. Each process takes 2 pairs a
# step in micro-batches of 1 (so gradients accumulate under no_sync). 3 held-out pairs split 2 + 1.
TRAIN = {"batch_size": 4, "micro_batch_size": 1, "max_steps": 6, "epochs": 2, "learning_rate": 1e-3,
         "lr_scheduler": "cosine", "warmup_steps": 1, "eval_every": 2, "save_every": 2, "keep_checkpoints": 3}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in _records(run_dir) if key in m}


def _launch(config: str, recipe: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    command = [ACCELERATE, "launch", "--config_file", str(CONFIGS / config), *extra,
               "-m", "prefopt.cli", "train", str(recipe), "--no-progress"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_model_dir):
    """One 2-process run (fresh reference cache, evaluation, checkpoints): its directory, tree and cache."""
    root = tmp_path_factory.mktemp("distributed")
    data = root / "prefs"
    data.mkdir()
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "test.jsonl", rows[:3])

    def tree(out: Path) -> dict:
        return tiny_recipe(tiny_model_dir, data, out, data={"eval_split": "test"}, train=TRAIN,
                           eval={"at_start": False, "task_metrics": False, "batch_size": 1})

    run_dir, cache = root / "two", root / "cache"
    recipe = root / "two.yaml"
    recipe.write_text(yaml.safe_dump(tree(run_dir)))
    env = {**os.environ, "PREFOPT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = _launch("ddp_cpu.yaml", recipe, env)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, tree, cache


def test_two_processes_train_like_one(two_processes, tmp_path, monkeypatch):
    run_dir, tree, cache = two_processes
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2
    assert [c["hit"] for c in summary["reference"]["caches"]] == [False, False]  # built in the 2-process run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-0000002", "step-0000004", "step-0000006"]

    monkeypatch.setenv("PREFOPT_CACHE", str(cache))
    one = engine.train(validated(tree(tmp_path / "one")), show_progress=False)
    assert one["processes"] == 1 and [c["hit"] for c in one["reference"]["caches"]] == [True, True]

    two_losses, one_losses = _losses(run_dir), _losses(tmp_path / "one")
    assert list(two_losses) == list(one_losses) == [1, 2, 3, 4, 5, 6]
    for step, value in one_losses.items():
        assert two_losses[step] == pytest.approx(value, rel=0, abs=1e-5), step
    two_eval, one_eval = _losses(run_dir, "eval/loss"), _losses(tmp_path / "one", "eval/loss")
    assert list(two_eval) == list(one_eval) == [2, 4, 6]
    for step, value in one_eval.items():  # a mean over 3 pairs, not a mean of the 2 processes' means
        assert two_eval[step] == pytest.approx(value, rel=0, abs=1e-5), step
    assert summary["eval_end"]["eval/rewards/accuracies"] == pytest.approx(one["eval_end"]["eval/rewards/accuracies"])
    # tokens_per_s counts every process's tokens: per pair it is the same as in one process
    for two, single in zip(_records(run_dir), _records(tmp_path / "one")):
        if "tokens_per_s" in single:
            ratio = single["tokens_per_s"] / single["pairs_per_s"]
            assert two["tokens_per_s"] / two["pairs_per_s"] == pytest.approx(ratio, rel=1e-9)


def test_a_two_process_checkpoint_resumes_in_one_process(two_processes, tmp_path, monkeypatch, capsys):
    run_dir, tree, cache = two_processes
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    monkeypatch.setenv("PREFOPT_CACHE", str(cache))
    engine.train(validated(tree(resumed)), show_progress=False)
    assert "resuming from" in capsys.readouterr().out
    expected, continued = _losses(run_dir), _losses(resumed)
    assert list(continued) == [3, 4, 5, 6]
    for step, value in continued.items():
        assert value == pytest.approx(expected[step], rel=0, abs=1e-5), step


def test_fsdp_on_cpu_stops_with_one_line(two_processes):
    """accelerate 1.15 runs FSDP only on GPU-like devices: the failing process says so in one line, exit status 2."""
    run_dir, _, cache = two_processes
    recipe = run_dir.parent / "two.yaml"
    env = {**os.environ, "PREFOPT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = _launch("fsdp.yaml", recipe, env, "--num_processes", "2")
    assert done.returncode != 0
    # the launcher stops the other process once one exits, so one or both say it; messages are read by
    # their prefix rather than by line because two processes' writes to one stderr can interleave
    messages = {message.strip() for message in done.stderr.split("prefopt: error: ")[1:]}
    messages = {message.splitlines()[0] for message in messages}
    assert len(messages) == 1, done.stderr[-3000:]
    (message,) = messages
    assert message.startswith("FSDP needs GPUs: accelerate ") and "runs FSDP only on" in message
    assert message.endswith("--config_file recipes/accelerate/ddp_cpu.yaml (DDP over gloo) instead")
    assert "exitcode  : 2" in done.stderr


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_without_the_package_names_it(two_processes, capsys, monkeypatch):
    run_dir, _, _ = two_processes
    recipe = run_dir.parent / "two.yaml"
    # accelerate's launcher stops before any process starts ...
    done = _launch("deepspeed_zero2.yaml", recipe, dict(os.environ), "--num_processes", "2")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: DeepSpeed is not installed => run `pip3 install deepspeed` or build it from source.")
    # ... and a process started another way (torchrun with accelerate's variables) stops in one line
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert main(["train", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("prefopt: error: this run was launched for DeepSpeed but the package 'deepspeed' is not "
                   "installed: pip install deepspeed, or launch with another config in recipes/accelerate/")


FSDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM
from prefopt.forward.batching import PreferenceBatch
from prefopt.forward.logprobs import sequence_logps, supports_head_path
dist.init_process_group("gloo", rank=0, world_size=1)
plain = AutoModelForCausalLM.from_pretrained(sys.argv[1])
sharded = AutoModelForCausalLM.from_pretrained(sys.argv[1])
for layer in sharded.model.layers:
    fully_shard(layer)
fully_shard(sharded)
ids = torch.randint(3, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
response = torch.zeros_like(ids, dtype=torch.bool)
response[:, 5:] = True
batch = PreferenceBatch(ids, torch.ones_like(ids), response, torch.arange(2))
assert supports_head_path(plain) and not supports_head_path(sharded)
with torch.no_grad():
    want = sequence_logps(plain, batch).sums
    got = sequence_logps(sharded, batch).sums
torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
dist.destroy_process_group()
print("ok")
"""


def test_an_fsdp_model_takes_the_full_logits_path(tiny_model_dir):
    """Outside its forward an FSDP model's output head holds a shard: log-probs come from full logits.
    torch's FSDP2 runs on CPU (accelerate does not route FSDP there), so this runs it directly."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(tiny_model_dir)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SAMPLER = {"name": "transformers", "max_new_tokens": 6}
JUDGE = {"name": "function", "function": "helpers:text_length_reward"}


@pytest.mark.parametrize("variant", ["stepwise", "trdpo", "iterative_dpo", "sapo"])
def test_two_processes_run_stages_and_a_following_reference_like_one(variant, two_processes, tmp_path, monkeypatch):
    """sDPO's stages keep the process group between stages; TR-DPO's syncs happen on every process alike;
    online rounds and SAPO's augmentations are sampled by the main process and broadcast, so both processes
    train on exactly the pairs one process would."""
    _, tree, cache = two_processes
    extra = {"stepwise": {"algorithm": {"name": "stepwise", "stages": 2, "split": "random"}},
             "trdpo": {"reference": {"sync": {"mode": "soft", "alpha": 0.5, "every": 1}}},
             "iterative_dpo": {"algorithm": {"name": "iterative_dpo", "rounds": 3, "prompts_per_round": 8,
                                             "sampler": SAMPLER, "judge": JUDGE}},
             "sapo": {"algorithm": {"name": "sapo", "segment_tokens": 4, "reference_refresh_every": 2,
                                    "sampler": SAMPLER}}}[variant]
    recipe = tmp_path / "two.yaml"
    recipe.write_text(yaml.safe_dump({**tree(tmp_path / "two"), **extra}))
    tests_dir = str(Path(__file__).parent)  # the judge function lives in tests/helpers.py
    env = {**os.environ, "PREFOPT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = _launch("ddp_cpu.yaml", recipe, env)
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.setenv("PREFOPT_CACHE", str(cache))
    engine.run(validated({**tree(tmp_path / "one"), **extra}), show_progress=False)
    runs = ["stages/stage-1", "stages/stage-2"] if variant == "stepwise" else ["."]
    for run in runs:
        two_losses, one_losses = _losses(tmp_path / "two" / run), _losses(tmp_path / "one" / run)
        assert list(two_losses) == list(one_losses) and one_losses
        for step, value in one_losses.items():
            assert two_losses[step] == pytest.approx(value, rel=0, abs=1e-5), (run, step)
