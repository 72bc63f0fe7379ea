"""`prefopt bench`: the bench recipe and its errors, a tiny bench end to end, reruns, the report, and the
task-contract pieces it relies on (a seed-independent held-out split, the KL estimate).

The end-to-end bench is recipes/bench/smoke.yaml with conftest's tiny random-init Llama in place of
SmolLM2: 2 entries x 2 seeds of 2 steps on a sliver of the sentiment task, each run trained in its own
process as a real bench does. One entry cannot move (learning rate 1e-9), the other moves a lot (0.5), so
their KL to the reference must differ.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from prefopt.bench.recipe import load_bench
from prefopt.cli import main
from prefopt.errors import PrefoptError, RecipeError
from prefopt.paths import CACHE_ENV, cache_dir, cache_root
from prefopt.api.task import KL_METRIC, EvalOptions

ROOT = Path(__file__).parent.parent
# Read before any fixture points PREFOPT_CACHE at a temporary directory.
USER_SDIST = cache_root() / "assets" / "vaderSentiment-3.3.2.tar.gz"
TINY_TASK = {"name": "sentiment", "num_train_prompts": 24, "num_eval_prompts": 6, "completions_per_prompt": 4,
             "max_new_tokens": 8, "batch_size": 32, "eval_seed": 0}
PNGS = ("frontier.png", "winrate_kl.png", "curves.png", "length_reward.png", "throughput_memory.png")


@pytest.fixture(autouse=True)
def restore_tqdm_setting(monkeypatch):
    """main() sets TQDM_DISABLE for --no-progress; give the rest of the session its own setting back."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


def seed_sdist() -> None:
    """The VADER corpus ships only in its sdist; reuse the user's copy rather than downloading it."""
    cached = cache_dir("assets") / USER_SDIST.name
    if USER_SDIST.is_file() and not cached.is_file():
        shutil.copy(USER_SDIST, cached)


def base_recipe(model_dir: Path) -> dict:
    return {
        "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"task": dict(TINY_TASK), "max_length": 32, "max_prompt_length": 16},
        "loss": {"name": "dpo", "beta": 0.1},
        "train": {"batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3, "lr_scheduler": "constant",
                  "max_steps": 5},
        "eval": {"at_start": False, "task_metrics": False},
        "output": {"dir": "unused", "trackers": []},
    }


def bench_recipe(out: Path, **changes) -> dict:
    tree = {
        "base": "base.yaml",
        "overrides": ["train.max_steps=2"],
        "seeds": [0, 1],
        "entries": [
            {"name": "still", "overrides": ["train.learning_rate=1.0e-9"]},
            {"name": "moved", "overrides": ["train.learning_rate=0.5"]},
        ],
        "eval": {"num_prompts": 4, "samples_per_prompt": 2, "max_new_tokens": 8},
        "output": {"dir": str(out)},
    }
    tree.update(changes)
    return tree


def write_bench(folder: Path, model_dir: Path, out: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(yaml.safe_dump(base_recipe(model_dir)))
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(bench_recipe(out, **changes)))
    return path


def read_rows(bench_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (bench_dir / "results.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------
# the bench recipe


def test_schema_problems_are_reported_at_once_naming_their_keys(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({
        "base": "base.yaml", "overides": ["loss.beta=0.2"], "seeds": [0, 0],
        "entries": [{"name": "a/b"}, {"name": "ok", "overrides": ["seed=3"]}, {"name": "initial"}],
        "eval": {"num_prompts": 0}, "output": {},
    }))
    with pytest.raises(RecipeError) as caught:
        load_bench(path)
    problems = "\n".join(caught.value.problems)
    for expected in ("overides: unknown key (did you mean 'overrides'", "seeds: seed 0 is listed twice",
                     "entries[0].name: 'a/b' is not a safe directory name", "entries[1].overrides: item 0 ('seed=3') "
                     "sets seed", "entries[2].name: 'initial' is reserved", "eval.num_prompts:",
                     "output.dir: required but missing"):
        assert expected in problems
    assert len(caught.value.problems) == 7


def test_duplicate_names_and_unquoted_mappings_are_refused(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text("base: base.yaml\nentries:\n  - {name: dpo}\n  - {name: dpo}\noutput: {dir: x}\n"
                    "overrides:\n  - loss={name: dpo}\n")
    with pytest.raises(RecipeError) as caught:
        load_bench(path)
    problems = "\n".join(caught.value.problems)
    assert "entries[1] is named 'dpo' like entries[0]" in problems
    assert "overrides: item 0 is a dict" in problems and "quote it" in problems


def test_every_entry_recipe_is_validated_before_training_naming_the_entry(tmp_path, tiny_model_dir):
    path = write_bench(tmp_path, tiny_model_dir, tmp_path / "out", entries=[
        {"name": "good", "overrides": ["loss.beta=0.2"]},
        {"name": "typo", "overrides": ["loss.name=dpoo"]},
        {"name": "bounds", "overrides": ["loss.beta=-1", "train.batch_sise=3"]},
    ])
    with pytest.raises(RecipeError) as caught:
        load_bench(path)
    problems = caught.value.problems
    assert any(p.startswith("entries[1] 'typo': loss.name: unknown loss 'dpoo' (did you mean 'dpo'") for p in problems)
    assert any(p.startswith("entries[2] 'bounds': loss.beta:") for p in problems)
    assert any(p.startswith("entries[2] 'bounds': train.batch_sise: unknown key") for p in problems)
    assert len(problems) == 3  # each once, not once per seed
    assert not (tmp_path / "out").exists(), "nothing may be written before every recipe is valid"


def test_derived_recipe_is_base_then_overrides_then_bench_keys(tmp_path, tiny_model_dir):
    bench = load_bench(write_bench(tmp_path, tiny_model_dir, tmp_path / "out"))
    assert [(r.entry, r.seed) for r in bench.runs] == [("still", 0), ("still", 1), ("moved", 0), ("moved", 1)]
    moved = bench.runs[3]
    assert moved.recipe.seed == 1 and moved.recipe.train.max_steps == 2 and moved.recipe.train.learning_rate == 0.5
    assert Path(moved.recipe.output.dir) == tmp_path / "out" / "runs" / "moved" / "seed-1"
    assert moved.recipe.output.save_model and moved.recipe.output.resume == "auto"
    assert not moved.recipe.output.merge_lora  # a LoRA run keeps its adapter, not a merged copy of the model
    assert bench.initial.train.learning_rate == 1e-3 and bench.initial.seed == 0


BENCH_RECIPES = sorted((ROOT / "recipes" / "bench").glob("*.yaml"))


@pytest.mark.parametrize("path", BENCH_RECIPES, ids=lambda p: p.name)
def test_shipped_bench_recipes_validate_every_run_and_comment_every_key(path):
    bench = load_bench(path)
    assert len(bench.runs) == len(bench.spec.entries) * len(bench.spec.seeds)
    for run in bench.runs:  # every run judged on the same held-out prompts, so their numbers compare
        task = run.recipe.data.task
        if task is not None:
            assert task.eval_seed is not None  # the task's held-out split does not follow the run's seed
        else:
            assert run.recipe.data.eval_split and bench.spec.eval.judge is not None  # one file's prompts, judged
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped and not stripped.endswith(":"):
            assert "#" in stripped, f"{path.name}:{number} has no comment: {stripped}"


# ----------------------------------------------------------------------------------------------------------
# the task contract: a held-out split that does not follow the seed, and the KL estimate


@pytest.fixture()
def sentiment(tmp_path, tiny_model_dir, tokenizer):
    from prefopt import TaskContext
    from prefopt_plugins.tasks.sentiment import SentimentConfig, SentimentTask

    seed_sdist()

    def task_and_context(seed: int, eval_seed: int | None):
        options = {k: v for k, v in TINY_TASK.items() if k != "name"} | {"num_train_prompts": 8, "num_eval_prompts": 4}
        config = SentimentConfig(**options | {"eval_seed": eval_seed})
        ctx = TaskContext(model_id=str(tiny_model_dir), tokenizer=tokenizer, load_model=lambda: load(tiny_model_dir),
                          cache_dir=tmp_path / "tasks", seed=seed, show_progress=False)
        return SentimentTask(config), ctx

    return task_and_context


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_eval_seed_holds_out_the_same_prompts_for_every_seed(sentiment):
    first, second = (task.build(ctx) for task, ctx in (sentiment(seed=0, eval_seed=5), sentiment(seed=1, eval_seed=5)))
    prompts = lambda data: (data.eval.parent / "eval_prompts.jsonl").read_text()  # noqa: E731
    assert prompts(first) == prompts(second) and first.eval.read_bytes() == second.eval.read_bytes()
    assert first.scored_file == first.eval.parent / "eval_prompts.jsonl"  # what the reward is scored on
    assert first.train.read_bytes() != second.train.read_bytes()
    held_out = {json.loads(line)["snippet_id"] for line in prompts(first).splitlines()}
    for data in (first, second):
        trained = {json.loads(line)["snippet_id"] for line in data.train.read_text().splitlines()}
        assert not trained & held_out


def test_eval_seed_equal_to_the_seed_is_the_split_built_before(sentiment):
    keys = [task._cache_key(ctx) for task, ctx in (sentiment(3, None), sentiment(3, 3), sentiment(3, 4))]
    assert keys[0] == keys[1] != keys[2]  # caches built before eval_seed existed stay valid


def test_kl_of_a_model_to_itself_is_zero_and_options_limit_the_sampling(sentiment, tiny_model_dir, tokenizer):
    task, ctx = sentiment(seed=0, eval_seed=0)
    data = task.build(ctx)
    model = load(tiny_model_dir)
    metrics = task.evaluate(model, tokenizer, data, reference=model, options=EvalOptions(2, 3, 5))
    assert metrics[KL_METRIC] == 0.0
    assert 0 <= metrics["length/mean_tokens"] <= 5
    assert KL_METRIC not in task.evaluate(model, tokenizer, data)  # without a reference: as before
    with pytest.raises(PrefoptError, match="ask for fewer"):
        task.evaluate(model, tokenizer, data, options=EvalOptions(num_prompts=99))


# ----------------------------------------------------------------------------------------------------------
# a tiny bench end to end


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """recipes/bench/smoke.yaml run once on the tiny model, shared by the tests that read its outputs.
    Module-scoped fixtures are set up before conftest's per-test cache redirect, so this one points
    PREFOPT_CACHE at a private directory itself."""
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "out"
    tree = yaml.safe_load((ROOT / "recipes" / "bench" / "smoke.yaml").read_text())
    tree["base"] = str(ROOT / "recipes" / "dpo" / "quickstart.yaml")
    tree["overrides"].append(f"model.path={tiny_model_dir}")
    tree["output"]["dir"] = str(out)
    path = folder / "smoke.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(folder / "cache"))
        mp.delenv("TQDM_DISABLE", raising=False)  # as restore_tqdm_setting, which a module fixture cannot use
        seed_sdist()
        assert main(["bench", str(path), "--no-progress"]) == 0
    return path, out


def test_bench_writes_one_row_per_run_with_its_measurements(finished):
    _, out = finished
    rows = read_rows(out)
    assert [(r["entry"], r["seed"]) for r in rows] == [("frozen", 0), ("frozen", 1), ("moved", 0), ("moved", 1)]
    for row in rows:
        assert -1 <= row["reward"] <= 1 and 0 <= row["length"] <= 8 and 0 <= row["accuracy"] <= 1
        assert row["tokens_per_s"] > 0 and row["pairs_per_s"] > 0 and row["steps"] == 2
        assert 50 < row["peak_rss_mib"] < 20_000 and row["wall_s"] > 0 and math.isfinite(row["final_loss"])
        saved = Path(row["run_dir"], "model")
        # LoRA runs (frozen) keep only their adapter; the full fine-tuning (moved) saves the whole model.
        assert (saved / ("adapter_config.json" if row["entry"] == "frozen" else "config.json")).is_file()
    # Every run, whatever its seed, was scored on the same held-out data.
    assert len({r["eval_data_sha256"] for r in rows}) == 1
    assert len({r["scored_data_sha256"] for r in rows}) == 1 and rows[0]["scored_data_sha256"] is not None


def test_kl_is_zero_for_the_initial_model_and_grows_with_the_learning_rate(finished):
    _, out = finished
    initial = json.loads((out / "initial" / "bench-eval.json").read_text())
    assert abs(initial["kl"]) < 1e-5
    rows = read_rows(out)
    frozen = [r["kl"] for r in rows if r["entry"] == "frozen"]
    moved = [r["kl"] for r in rows if r["entry"] == "moved"]
    assert max(abs(k) for k in frozen) < 1e-5
    assert min(moved) > 1.0


def test_every_completion_is_kept_and_compared_with_the_initial_models(finished):
    from prefopt.bench.files import COMPLETIONS_FILE

    _, out = finished

    def lines(directory: Path) -> list[dict]:
        return [json.loads(line) for line in (directory / COMPLETIONS_FILE).read_text().splitlines()]

    initial = lines(out / "initial")
    assert len(initial) == 4 * 2 and all(line["outcome"] is None for line in initial)  # eval: 4 prompts x 2 samples
    assert json.loads((out / "initial" / "bench-eval.json").read_text())["win_rate"] is None
    for row in read_rows(out):
        mine = lines(Path(row["run_dir"]))
        assert [(m["prompt_index"], m["sample"], m["prompt"]) for m in mine] == [
            (i["prompt_index"], i["sample"], i["prompt"]) for i in initial]
        by_hand = [1.0 if m["score"] > i["score"] else 0.0 if m["score"] < i["score"] else 0.5
                   for m, i in zip(mine, initial)]
        assert [m["outcome"] for m in mine] == by_hand
        assert row["win_rate"] == pytest.approx(statistics.fmean(by_hand), abs=1e-12)
        assert row["reward"] == pytest.approx(statistics.fmean(m["score"] for m in mine), abs=1e-12)
        if row["entry"] == "frozen":  # weights as they were: the initial model's very completions, all ties
            assert [m["completion"] for m in mine] == [i["completion"] for i in initial]
            assert row["win_rate"] == row["lc_win_rate"] == 0.5


def test_leaderboard_aggregates_the_rows_and_embeds_the_plots(finished):
    _, out = finished
    rows = read_rows(out)
    board = json.loads((out / "leaderboard.json").read_text())
    assert [e["entry"] for e in board["entries"]] == sorted(
        {r["entry"] for r in rows}, key=lambda name: -statistics.fmean(r["reward"] for r in rows if r["entry"] == name))
    for entry in board["entries"]:
        mine = [r for r in rows if r["entry"] == entry["entry"]]
        for metric in ("reward", "kl", "length", "accuracy", "tokens_per_s", "peak_rss_mib"):
            assert entry[metric]["mean"] == pytest.approx(statistics.fmean(r[metric] for r in mine))
            assert entry[metric]["min"] == min(r[metric] for r in mine)
    for png in PNGS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "leaderboard.html").read_text()
    assert page.count("data:image/png;base64,") == len(PNGS) and "http" not in page
    markdown = (out / "leaderboard.md").read_text()
    assert "| 1 | " in markdown and "initial model (untrained)" in markdown and "![" in markdown


def test_rerun_skips_finished_runs_and_report_only_rebuilds(finished, capsys):
    path, out = finished
    measured = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed-*/bench-*.json")}
    assert len(measured) == 8
    for png in PNGS:
        (out / png).unlink()
    assert main(["bench", str(path), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("skipped, finished by an earlier invocation") == 4
    assert {p: p.stat().st_mtime_ns for p in measured} == measured
    assert all((out / png).is_file() for png in PNGS)

    (out / "leaderboard.md").unlink()
    assert main(["bench", str(path), "--report-only"]) == 0
    assert "frozen" in (out / "leaderboard.md").read_text()


def test_a_changed_recipe_does_not_resume_old_runs(finished, tmp_path, capsys):
    path, out = finished
    changed = yaml.safe_load(path.read_text())
    changed["entries"][1]["overrides"] = ["train.learning_rate=0.01"]
    other = path.with_name("changed.yaml")
    other.write_text(yaml.safe_dump(changed))
    assert main(["bench", str(other), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "2 run directories hold runs of another recipe" in error and "train.learning_rate" in error


def test_only_names_entries(finished, capsys):
    path, _ = finished
    assert main(["bench", str(path), "--only", "moevd"]) == 2
    assert "--only moevd: no such entry" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# what the new bench recipes need: a check for models made beforehand, chosen curves, staged runs


def test_a_missing_local_model_stops_the_bench_before_anything_runs(tmp_path, tiny_model_dir, capsys):
    from prefopt.bench.runner import check_local_models
    from prefopt.data.load import looks_local

    missing = tmp_path / "runs" / "quickstart" / "model"
    path = write_bench(tmp_path, tiny_model_dir, tmp_path / "out", entries=[
        {"name": "dpo", "overrides": []},
        {"name": "mrpo", "overrides": ["loss.name=mrpo", f"reference.extra=[{missing}]"]},
    ])
    assert main(["bench", str(path), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"reference.extra {missing} (entry mrpo) does not exist" in error
    assert f"header of {path}" in error and "--only" in error
    assert not (tmp_path / "out").exists(), "nothing may run, not even the initial model's evaluation"
    bench = load_bench(path)
    check_local_models(bench, [run for run in bench.runs if run.entry == "dpo"])  # --only dpo may run
    assert looks_local("runs/quickstart/model") and looks_local("./model") and looks_local("/abs/dir")
    assert not looks_local("HuggingFaceTB/SmolLM2-360M-Instruct") and not looks_local("smollm2-135m-instruct")


def write_metrics(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_curves_plot_the_recipes_keys_with_eval_lines_and_stages_joined(tmp_path, tiny_model_dir):
    from prefopt.bench.report import write_report
    from prefopt.bench.results import METRICS, seed_mean_curves, training_steps

    plain, staged = tmp_path / "plain", tmp_path / "staged"
    write_metrics(plain / "metrics.jsonl", [
        {"step": 0, "eval/logps/chosen": -10.0}, {"step": 1, "loss": 0.7, "logps/chosen": -9.0},
        {"step": 2, "loss": 0.6, "logps/chosen": -8.0}, {"step": 2, "eval/logps/chosen": -12.0},
    ])
    # algorithm stepwise: one metrics.jsonl per stage, each counting steps from 1
    write_metrics(staged / "stages" / "stage-1" / "metrics.jsonl", [
        {"step": 0, "eval/logps/chosen": -10.0}, {"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.5}])
    write_metrics(staged / "stages" / "stage-2" / "metrics.jsonl", [
        {"step": 1, "loss": 0.68}, {"step": 2, "loss": 0.4}, {"step": 2, "eval/logps/chosen": -11.0}])
    assert [(s["step"], s["loss"]) for s in training_steps(staged)] == [(1, 0.69), (2, 0.5), (3, 0.68), (4, 0.4)]
    rows = [{"entry": entry, "seed": 0, "overrides": [], "run_dir": str(run_dir), **{m: 0.5 for m in METRICS}}
            for entry, run_dir in (("dpo", plain), ("sdpo", staged))]
    keys = ("loss", "eval/logps/chosen")
    curves = seed_mean_curves(rows, keys)
    assert curves["dpo"]["eval/logps/chosen"] == [(0, -10.0), (2, -12.0)]
    assert curves["sdpo"]["eval/logps/chosen"] == [(0, -10.0), (4, -11.0)]

    path = write_bench(tmp_path, tiny_model_dir, tmp_path / "out", plots={"curves": [*keys, "logps/chosen", "x/y"]})
    bench = load_bench(path, with_runs=False)
    assert bench.spec.plots.curves == [*keys, "logps/chosen", "x/y"]  # any key; a panel stays empty without data
    report = write_report(bench, rows)
    assert report["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_bench(write_bench(tmp_path, tiny_model_dir, tmp_path / "out"), with_runs=False).spec.plots.curves \
        == ["loss", "logps/chosen"]
    with pytest.raises(RecipeError, match="plots.curvs: unknown key"):
        load_bench(write_bench(tmp_path, tiny_model_dir, tmp_path / "out", plots={"curvs": ["loss"]}))


def test_the_comparability_line_follows_the_scored_prompts_not_the_pairs_labels():
    from types import SimpleNamespace

    from prefopt.bench.report import _setup_lines

    spec = SimpleNamespace(overrides=[], seeds=[0, 1], entries=[1, 2],
                           eval=SimpleNamespace(num_prompts=4, samples_per_prompt=1, max_new_tokens=8))
    bench = SimpleNamespace(spec=spec, base="base.yaml")

    def line(*digests, initial=None):
        rows = [{"entry": f"e{i}", "scored_data_sha256": scored, "eval_data_sha256": pairs}
                for i, (scored, pairs) in enumerate(digests)]
        return _setup_lines(bench, rows, initial)[1]

    # same prompts, pairs labelled otherwise (a biased labeller in one entry): rewards compare, accuracies not
    relabelled = line(("p", "a"), ("p", "b"), initial={"scored_data_sha256": "p", "eval_data_sha256": "a"})
    assert "warning" not in relabelled and "labels differ" in relabelled
    assert "warning" in line(("p", "a"), ("q", "a"))  # other prompts
    assert "labels differ" not in line(("p", "a"), ("p", "a"))
    # results evaluated before the scored file was recorded fall back to the pairs' digest
    assert "warning" in line((None, "a"), ("p", "b"))

