"""End-to-end training on the tiny model: learning, exact accumulation, caching, resume, outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import tiny_recipe, validated
from prefopt import engine


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in _metrics(run_dir) if "loss" in m}


def test_training_raises_held_out_margin_and_accuracy(tiny_model_dir, pairs_dir, tmp_path):
    tree = tiny_recipe(
        tiny_model_dir, pairs_dir, tmp_path / "run",
        data={"eval_split": "test"}, eval={"at_start": True, "task_metrics": False},
        train={"max_steps": 12, "epochs": 4, "learning_rate": 3e-3},
    )
    summary = engine.train(validated(tree), show_progress=False)
    start, end = summary["eval_start"], summary["eval_end"]
    assert start["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
    assert start["eval/rewards/accuracies"] == 0.5  # every pair a tie, not a count of rounding signs
    assert end["eval/rewards/margins"] > 0.05
    assert end["eval/rewards/accuracies"] > start["eval/rewards/accuracies"]
    assert end["eval/loss"] < start["eval/loss"]
    steps = [m["step"] for m in _metrics(tmp_path / "run") if "loss" in m]
    assert steps == list(range(1, 13))


def _one_step_update(model_dir, data, out, micro_batch_size) -> dict[str, torch.Tensor]:
    tree = tiny_recipe(model_dir, data, out, train={"batch_size": 8, "micro_batch_size": micro_batch_size,
                                                    "max_steps": 1, "max_grad_norm": None})
    run = engine.setup(validated(tree), show_progress=False)
    before = {n: p.detach().clone() for n, p in run.policy.named_parameters()}
    engine.train_step(run, 0)
    return {n: p.detach() - before[n] for n, p in run.policy.named_parameters()}


def test_gradient_accumulation_4x2_equals_one_batch_of_8(tiny_model_dir, pairs_file, tmp_path):
    """8 pairs in one forward, or 4 micro-batches of 2 accumulated: the same update to 1e-5."""
    whole = _one_step_update(tiny_model_dir, pairs_file, tmp_path / "a", micro_batch_size=8)
    accumulated = _one_step_update(tiny_model_dir, pairs_file, tmp_path / "b", micro_batch_size=2)
    assert max(d.abs().max() for d in whole.values()) > 1e-4  # the step did move the weights
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=0, atol=1e-5, msg=name)


def test_second_run_reuses_reference_cache_and_max_length_invalidates_it(
    tiny_model_dir, pairs_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))  # start with no cache at all
    first = engine.train(validated(tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "1")), show_progress=False)
    assert first["reference"]["caches"][0]["hit"] is False
    assert first["reference"]["forward_passes"] > 0

    second = engine.train(validated(tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "2")), show_progress=False)
    assert second["reference"]["caches"][0] == {**first["reference"]["caches"][0], "hit": True}
    assert second["reference"]["forward_passes"] == 0  # no reference forward at all
    assert _train_losses(tmp_path / "2") == _train_losses(tmp_path / "1")

    longer = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "3", data={"max_length": 40})
    third = engine.train(validated(longer), show_progress=False)
    assert third["reference"]["caches"][0]["hit"] is False
    assert third["reference"]["caches"][0]["path"] != first["reference"]["caches"][0]["path"]


def test_cached_reference_gives_the_losses_of_a_live_reference(tiny_model_dir, pairs_file, tmp_path):
    engine.train(validated(tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "cache")), show_progress=False)
    live = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "live", reference={"kind": "live"})
    summary = engine.train(validated(live), show_progress=False)
    assert summary["reference"]["kind"] == "live"
    cached, live_losses = _train_losses(tmp_path / "cache"), _train_losses(tmp_path / "live")
    assert cached.keys() == live_losses.keys()
    for step in cached:
        assert cached[step] == pytest.approx(live_losses[step], abs=1e-5)


def test_lora_run_saves_a_merged_model_that_transformers_loads(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "run",
                       model={"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}},
                       train={"learning_rate": 1e-2, "max_steps": 3})
    summary = engine.train(validated(tree), show_progress=False)
    assert summary["reference"]["source"] == "policy with its LoRA adapter disabled"
    model_dir = tmp_path / "run" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model_dir)
    assert not any("lora" in name for name in model.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "the merged adapter must change some weights"


def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(tiny_model_dir, pairs_file, tmp_path, capsys):
    """Kill -9 a run after its first checkpoint, rerun the same command: the loss sequence is the same."""
    train = {"batch_size": 4, "micro_batch_size": 1, "max_steps": None, "epochs": 4, "lr_scheduler": "cosine",
             "warmup_steps": 2, "save_every": 3, "learning_rate": 1e-3}  # 12 pairs / 4 = 3 steps an epoch: 12
    uninterrupted = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "full", train=train)
    engine.train(validated(uninterrupted), show_progress=False)

    interrupted = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "killed", train=train)
    recipe_path = tmp_path / "killed.yaml"
    recipe_path.write_text(yaml.safe_dump(interrupted))
    process = subprocess.Popen(
        [sys.executable, "-m", "prefopt.cli", "train", str(recipe_path), "--no-progress"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    first_checkpoint = tmp_path / "killed" / "checkpoints" / "step-0000003"
    deadline = time.time() + 240
    while not first_checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "summary.json").exists()

    capsys.readouterr()
    engine.train(validated(interrupted), show_progress=False)  # what `prefopt train` runs again
    assert "resuming from" in capsys.readouterr().out
    full_losses, resumed_losses = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "killed")
    assert list(resumed_losses) == list(range(1, 13))
    for step, value in full_losses.items():
        assert resumed_losses[step] == pytest.approx(value, rel=0, abs=1e-6), step


def test_gradient_checkpointing_gives_the_same_update(tiny_model_dir, pairs_file, tmp_path):
    def update(directory, checkpointing):
        tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / directory,
                           model={"path": str(tiny_model_dir), "gradient_checkpointing": checkpointing},
                           train={"max_steps": 1, "max_grad_norm": None})
        run = engine.setup(validated(tree), show_progress=False)
        before = {n: p.detach().clone() for n, p in run.policy.named_parameters()}
        engine.train_step(run, 0)
        return {n: p.detach() - before[n] for n, p in run.policy.named_parameters()}

    plain, recomputed = update("plain", False), update("ckpt", True)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-6, msg=name)


def test_bf16_autocast_losses_follow_fp32_and_log_to_tensorboard(tiny_model_dir, pairs_file, tmp_path):
    steps = 20

    def losses(precision: str) -> dict[int, float]:
        out = tmp_path / precision
        tree = tiny_recipe(tiny_model_dir, pairs_file, out,
                           train={"mixed_precision": precision, "max_steps": steps, "epochs": steps,
                                  "learning_rate": 3e-3},
                           output={"dir": str(out), "trackers": ["tensorboard"] if precision == "bf16" else []})
        engine.train(validated(tree), show_progress=False)
        return _train_losses(out)

    bf16, fp32 = losses("bf16"), losses("no")
    assert sorted(bf16) == sorted(fp32) == list(range(1, steps + 1))
    assert min(fp32.values()) < fp32[1] - 0.05  # fp32 learns, so the comparison covers moving weights
    # Autocast runs the matmuls in bf16 (8 significant bits, relative spacing 2**-8) and keeps log-softmax,
    # sums and the weights (the master copy the optimizer updates) in fp32. The rounding errors of a matmul's
    # products have random signs and partly cancel in the log-ratio margin, and beta 0.1 scales what is left;
    # the weights then drift apart a little every step, so the gap grows: at most 2.9e-3 here over 20 steps,
    # on an AVX-512 BF16 CPU (other CPUs round bf16 products in other orders). 1.5e-2 is 5x that, while a
    # log-softmax in bf16 (errors of 2**-8 of the ~300-nat sequence log-probs, ~1 nat, times beta ~0.1) would
    # be far outside it.
    for step in fp32:
        assert bf16[step] == pytest.approx(fp32[step], abs=1.5e-2), step
    assert any(bf16[step] != fp32[step] for step in fp32)  # autocast did run in bf16
    assert list((tmp_path / "bf16").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    # The master weights stay fp32: the saved model holds only float32 tensors.
    from safetensors import safe_open

    saved = list((tmp_path / "bf16" / "model").glob("*.safetensors"))
    assert saved
    for path in saved:
        with safe_open(str(path), "pt") as tensors:
            assert {tensors.get_slice(name).get_dtype() for name in tensors.keys()} == {"F32"}, path


def test_a_phase_is_closed_however_the_run_ends_and_keeps_off_the_engines_file_names(
    tiny_model_dir, pairs_file, tmp_path
):
    from prefopt import Phase
    from prefopt.errors import PrefoptError

    class Recording(Phase):
        closed = False

        def checkpoint_state(self):
            return {}, {"rng": {}}  # would overwrite the checkpoint's random-generator states

        def close(self):
            self.closed = True

    phase = Recording()
    too_big = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "big", train={"batch_size": 16})  # 12 pairs
    with pytest.raises(PrefoptError, match="fewer than train.batch_size"):
        engine.train(validated(too_big), phase=phase, show_progress=False)
    assert phase.closed
    phase = Recording()
    one_step = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "one", train={"max_steps": 1})
    with pytest.raises(ValueError, match=r"checkpoint_state names tensor sets \['rng'\]"):
        engine.train(validated(one_step), phase=phase, show_progress=False)
    assert phase.closed


def test_a_phase_that_plans_its_own_steps_must_say_how_many(tiny_model_dir, pairs_file, tmp_path):
    from prefopt import Phase
    from prefopt.errors import PrefoptError

    class NoPlan(Phase):
        pass

    recipe = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "run", train={"max_steps": 1})
    with pytest.raises(PrefoptError, match="NoPlan sets plans_own_steps but does not define total_steps"):
        engine.train(validated(recipe), phase=NoPlan(plans_own_steps=True), show_progress=False)
