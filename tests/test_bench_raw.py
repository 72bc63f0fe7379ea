"""benchmarks/bench_raw.py keeps what a reader needs to check a bench's numbers, and nothing else (no models, no
checkpoints), at the paths the bench wrote them."""

from __future__ import annotations

from helpers import load_benchmark

bench_raw = load_benchmark("bench_raw")


def test_keeps_the_leaderboard_the_initial_evaluation_and_each_runs_curves_and_completions(tmp_path):
    runs_dir, out = tmp_path / "bench", tmp_path / "out"
    kept = ["leaderboard.json", "leaderboard.md", "results.jsonl", "frontier.png", "length_reward.png",
            "initial/bench-eval.json",
            "initial/bench-completions.jsonl", "runs/dpo/seed-0/metrics.jsonl", "runs/dpo/seed-0/summary.json",
            "runs/dpo/seed-0/bench-completions.jsonl", "runs/dpo/seed-0/bench-train.json",
            "runs/mrpo/seed-1/metrics.jsonl", "runs/sdpo/seed-0/stages.json",
            "runs/sdpo/seed-0/stages/stage-1/summary.json"]
    left = ["leaderboard.html", "runs/dpo/seed-0/model/model.safetensors", "runs/dpo/seed-0/checkpoints/step-8/x",
            "runs/dpo/seed-0/bench-train.log", "runs/sdpo/seed-0/stages/stage-1/model/model.safetensors"]
    for name in kept + left:
        (runs_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (runs_dir / name).write_text(name)
    bench_raw.keep_results(runs_dir, out)
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert copied == sorted(kept)
    assert all((out / name).read_text() == name for name in kept)


def test_only_completions_per_run_when_asked(tmp_path):
    runs_dir, out = tmp_path / "bench", tmp_path / "out"
    for name in ("runs/a/seed-0/metrics.jsonl", "runs/a/seed-0/bench-completions.jsonl"):
        (runs_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (runs_dir / name).write_text("x")
    bench_raw.keep_results(runs_dir, out, per_run=["bench-completions.jsonl"])
    assert [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()] == ["runs/a/seed-0/bench-completions.jsonl"]


def test_output_dir_is_the_recipes_relative_to_the_checkout(tmp_path):
    recipe = tmp_path / "bench.yaml"
    recipe.write_text("output:\n  dir: runs/bench/x\n")
    assert bench_raw.output_dir(recipe) == bench_raw.ROOT / "runs/bench/x"
    recipe.write_text(f"output:\n  dir: {tmp_path / 'abs'}\n")
    assert bench_raw.output_dir(recipe) == tmp_path / "abs"


def test_a_bench_that_fails_exits_with_its_status_and_copies_nothing(tmp_path, monkeypatch):
    """The bench has already said why on stderr: no traceback on top, and no raw files from an unfinished bench."""
    import subprocess

    import pytest

    monkeypatch.setattr(bench_raw.provenance, "start", dict)  # git and torch are not what is tested here
    monkeypatch.setattr(bench_raw.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, returncode=2))
    with pytest.raises(SystemExit) as stopped:
        bench_raw.run_bench(tmp_path / "bench.yaml", tmp_path / "out")
    assert stopped.value.code == 2
    assert not (tmp_path / "out").exists()
