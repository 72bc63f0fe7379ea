"""Judged evaluation (``prefopt.judged``): one code path for a task's evaluation and for a bench on any data.

The sentiment task's ``evaluate()`` numbers are pinned (they were computed before its sampling moved into the
core, so the move is checked to leave them bit for bit). Then the bench's evaluation child on a plain JSONL
file with the ``function`` judge set to VADER must give the task's rewards exactly; a pairwise judge gives win
rates and no reward; a wrong judge name is a one-line error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from prefopt import PairwiseJudge, TaskContext, hookimpl
from prefopt.api.task import KL_METRIC, EvalOptions
from prefopt.bench.files import COMPLETIONS_FILE, EVAL_FILE, RECIPE_FILE
from prefopt.bench.recipe import load_bench
from prefopt.errors import PrefoptError, RecipeError
from prefopt.paths import CACHE_ENV, cache_dir, cache_root
from prefopt.recipe import dump_recipe
from prefopt.registry.loading import load_plugins

from conftest import tiny_config, write_jsonl

# All 5 held-out prompts of this build have a pair (none ties), so the held-out pairs exported to a plain file
# hold exactly the prompts the task evaluates, in its order. batch_size 8 over 3 samples per prompt cuts the
# prompts into batches of 2: several seeded batches are pinned, not one.
TINY_TASK = dict(num_train_prompts=6, num_eval_prompts=5, completions_per_prompt=8, max_new_tokens=10, batch_size=8,
                 eval_seed=3)
USER_SDIST = cache_root() / "assets" / "vaderSentiment-3.3.2.tar.gz"  # read before PREFOPT_CACHE is redirected


def seed_sdist() -> None:
    """The VADER corpus ships only in its sdist; reuse the user's copy rather than downloading it."""
    cached = cache_dir("assets") / USER_SDIST.name
    if USER_SDIST.is_file() and not cached.is_file():
        shutil.copy(USER_SDIST, cached)


def random_llama(tokenizer, seed: int):
    """conftest's tiny Llama with the weights of ``seed`` (seed 0: the weights of ``tiny_model_dir``)."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_config(len(tokenizer))).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, tokenizer):
    """The tiny sentiment build (seed 0, eval seed 3). Module-scoped fixtures are set up before conftest's
    per-test cache redirect, so this one points PREFOPT_CACHE at a private directory itself."""
    from prefopt_plugins.tasks.sentiment import SentimentConfig, SentimentTask

    task = SentimentTask(SentimentConfig(**TINY_TASK))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("judged-prefopt-cache")))
        seed_sdist()
        ctx = TaskContext(model_id=str(tiny_model_dir), tokenizer=tokenizer,
                          load_model=lambda: random_llama(tokenizer, 0), cache_dir=tmp_path_factory.mktemp("tasks"),
                          seed=0, show_progress=False)
        return task, task.build(ctx)


# ----------------------------------------------------------------------------------------------------------
# the sentiment task's numbers, pinned


def test_sentiment_evaluate_numbers_are_pinned(built, tokenizer):
    """Computed with the task's own sampling code before it moved into prefopt.judged; any change to the
    batching, the seeding, the EOS ids, the decoding or the scoring changes them."""
    task, data = built
    policy, reference = random_llama(tokenizer, 0), random_llama(tokenizer, 1)
    assert task.evaluate(policy, tokenizer, data) == {
        "reward/vader_mean": -0.02054, "reward/vader_std": 0.04108, "length/mean_tokens": 10.0,
    }
    metrics = task.evaluate(policy, tokenizer, data, reference=reference, options=EvalOptions(4, 3, 6))
    assert set(metrics) == {"reward/vader_mean", "reward/vader_std", "length/mean_tokens", KL_METRIC}
    # VADER scores decoded tokens and the length counts them: exact, if the same tokens are sampled.
    assert metrics["reward/vader_mean"] == -0.05110833333333334
    assert metrics["reward/vader_std"] == 0.14139628388759806
    assert metrics["length/mean_tokens"] == 6.0
    # The KL is a mean of differences of float32 log-probability sums, each about -65 (6 tokens of a random
    # model over a 49k vocabulary): another BLAS or thread count may move each sum by ~1e-5 (float32's 1e-7
    # relative), so the pin holds to 1e-4 absolute; on one machine it is exact.
    assert metrics[KL_METRIC] == pytest.approx(0.05781428019205729, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------
# the core: one path for a task and for any data


def test_judge_completions_keeps_every_record_and_measures_the_kl(built, tokenizer):
    from prefopt import JudgedOptions, judge_completions

    task, data = built
    prompts = task.eval_prompts(data)[:3]
    model = random_llama(tokenizer, 0)
    options = JudgedOptions(per_prompt=2, seed=7, batch_size=4, max_new_tokens=5)
    judged = judge_completions(model, tokenizer, prompts, task.score, model, options)
    assert [(r.prompt_index, r.sample) for r in judged.records] == [(i, k) for i in range(3) for k in range(2)]
    assert [r.prompt for r in judged.records] == [p for p in prompts for _ in range(2)]
    assert [r.score for r in judged.records] == task.score(prompts, [r.completion for r in judged.records])
    assert all(0 <= r.num_tokens <= 5 and r.finished == (r.num_tokens < 5 and r.token_ids[-1] == 2)
               for r in judged.records)
    assert judged.kl == 0.0 and all(r.kl == 0.0 for r in judged.records)  # the same model scores its own samples
    # Plain text tokenized here, or handed over as ids tokenized elsewhere: the same completions.
    ids = tokenizer(prompts).input_ids
    again = judge_completions(model, tokenizer, prompts, None, None, options, prompt_ids=ids)
    assert [r.completion for r in again.records] == [r.completion for r in judged.records]
    assert again.mean_score is None and again.kl is None and again.records[0].as_line()["score"] is None
    line = judged.records[0].as_line(outcome=1.0)
    assert set(line) == {"prompt_index", "sample", "prompt", "completion", "num_tokens", "finished", "score", "kl",
                         "outcome"}
    json.dumps(line)  # a completions-file line: plain JSON, no token ids


# ----------------------------------------------------------------------------------------------------------
# a bench on the task's pairs exported to a plain file, judged by VADER through the function judge

VADER = {"name": "function", "function": "prefopt_plugins.tasks.sentiment:completion_reward"}
# The task's own evaluation settings, said again for data that is no task: its eval seed, its batch size.
SAME_AS_TASK = {"num_prompts": 4, "samples_per_prompt": 3, "max_new_tokens": 6, "seed": TINY_TASK["eval_seed"],
                "batch_size": TINY_TASK["batch_size"]}


def export_pairs(data, folder: Path) -> Path:
    """The task's train and held-out pairs as a plain dataset folder (train.jsonl, test.jsonl)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, path in (("train", data.train), ("test", data.eval)):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        write_jsonl(folder / f"{split}.jsonl", [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows])
    return folder


def write_bench(folder: Path, model_dir: Path, data_dir: Path, evaluation: dict, **data) -> Path:
    base = {
        "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_dir), "eval_split": "test", "max_length": 64, "max_prompt_length": 32, **data},
        "loss": {"name": "dpo", "beta": 0.1},
        "train": {"batch_size": 2, "micro_batch_size": 2, "learning_rate": 1e-3, "max_steps": 1},
        "eval": {"at_start": False},
        "output": {"dir": "unused", "trackers": []},
    }
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    # lr 0.5: one step moves the tiny model far enough to sample other completions than the initial model
    bench = {"base": "base.yaml", "seeds": [0], "entries": [{"name": "moved", "overrides": ["train.learning_rate=0.5"]}],
             "eval": evaluation, "output": {"dir": str(folder / "out")}}
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(bench))
    return path


def recipe_file(directory: Path, recipe) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RECIPE_FILE
    path.write_text(dump_recipe(recipe))
    return path


def save_model(directory: Path, tokenizer, seed: int) -> None:
    """A run's saved model (``<output.dir>/model``): other random weights than the initial model's, made sharp.
    A random-init model is nearly uniform over the vocabulary, so two of them sample the same tokens from the same
    seed; scaled embeddings (tied to the output head) make this one's choices its own."""
    model = random_llama(tokenizer, seed)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(100.0)
    model.save_pretrained(directory / "model")


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def evaluator_of(bench, plugins=None):
    from prefopt.bench.evaluate import Evaluator

    return Evaluator(bench.spec.eval, bench.spec.seeds[0], plugins)


def test_a_bench_on_the_exported_pairs_gives_the_tasks_rewards_exactly(built, tmp_path, tiny_model_dir, tokenizer):
    from prefopt import judge_completions

    task, data = built
    path = write_bench(tmp_path, tiny_model_dir, export_pairs(data, tmp_path / "prefs"), {"judge": VADER,
                                                                                         **SAME_AS_TASK})
    bench = load_bench(path)
    assert bench.initial.data.task is None and bench.judged
    evaluator = evaluator_of(bench)
    result = evaluator.evaluate(recipe_file(bench.initial_dir, bench.initial), initial=True)

    model = random_llama(tokenizer, 0)  # the weights of tiny_model_dir
    options = EvalOptions(4, 3, 6)
    expected = task.evaluate(model, tokenizer, data, reference=model, options=options)
    assert result["reward"] == expected["reward/vader_mean"]
    assert result["metrics"]["reward/std"] == expected["reward/vader_std"]
    assert result["length"] == expected["length/mean_tokens"]
    assert result["kl"] == expected[KL_METRIC] == 0.0  # the initial model is its own reference
    assert result["win_rate"] is None and result["judge"] == VADER and result["sampling"]["seed"] == 3

    # Completion by completion: the same texts, the same scores, in the same order.
    lines = read_lines(bench.initial_dir / COMPLETIONS_FILE)
    own = judge_completions(model, tokenizer, task.eval_prompts(data)[:4], task.score, None,
                            task.eval_sampling(data, options))
    assert [(r.prompt, r.completion, r.score, r.num_tokens) for r in own.records] == [
        (line["prompt"], line["completion"], line["score"], line["num_tokens"]) for line in lines]
    assert all(line["kl"] == 0.0 and line["outcome"] is None for line in lines)

    # A trained run against the initial model: each outcome is its score against the initial score of the same
    # prompt and sample; the win rate is their mean.
    run = bench.runs[0]
    save_model(run.dir, tokenizer, seed=1)
    result = evaluator.evaluate(recipe_file(run.dir, run.recipe), initial=False,
                                baseline=bench.initial_dir / COMPLETIONS_FILE)
    mine = read_lines(run.dir / COMPLETIONS_FILE)
    assert [(m["prompt_index"], m["sample"], m["prompt"]) for m in mine] == [
        (i["prompt_index"], i["sample"], i["prompt"]) for i in lines]
    by_hand = [1.0 if m["score"] > i["score"] else 0.0 if m["score"] < i["score"] else 0.5 for m, i in zip(mine, lines)]
    assert [m["outcome"] for m in mine] == by_hand
    assert result["win_rate"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-12)
    assert 0 <= result["lc_win_rate"] <= 1 and result["kl"] != 0.0
    evaluator.close()


def test_a_reward_model_trained_with_prefopt_judges_a_bench(tmp_path, tiny_model_dir, tokenizer, pairs_dir):
    """The chain a user with preference data and no reward model follows, on the tiny model: train a
    Bradley-Terry model on the plain file through the engine, name its saved folder as the bench's judge, and
    every completion's score is what that model gives it; the outcomes against the initial model's completions
    follow the scores, and the win rate is their mean."""
    from helpers import tiny_recipe, validated
    from prefopt import engine
    from prefopt.api.judge import JudgeContext
    from prefopt.registry.loading import default_plugins
    from prefopt_plugins.judges.reward_model import RewardModelJudge

    tree = tiny_recipe(tiny_model_dir, pairs_dir, tmp_path / "rm", train={"max_steps": 2},
                       output={"save_model": True})
    tree["loss"] = {"name": "bradley_terry"}
    tree["data"]["append_eos"] = False  # a reward model is trained on what its judge will see
    run = engine.setup(validated(tree), show_progress=False)
    engine.fit(run, show_progress=False)
    engine.finish(run)

    judge = {"name": "reward_model", "path": str(tmp_path / "rm" / "model"), "format": "plain"}
    path = write_bench(tmp_path, tiny_model_dir, pairs_dir, {"judge": judge, "num_prompts": 4,
                                                             "samples_per_prompt": 2, "max_new_tokens": 6})
    bench = load_bench(path, default_plugins())
    evaluator = evaluator_of(bench)
    initial = evaluator.evaluate(recipe_file(bench.initial_dir, bench.initial), initial=True)
    entry = bench.runs[0]
    save_model(entry.dir, tokenizer, seed=1)
    result = evaluator.evaluate(recipe_file(entry.dir, entry.recipe), initial=False,
                                baseline=bench.initial_dir / COMPLETIONS_FILE)
    evaluator.close()

    before, mine = read_lines(bench.initial_dir / COMPLETIONS_FILE), read_lines(entry.dir / COMPLETIONS_FILE)
    assert len(before) == len(mine) == 8
    by_itself = RewardModelJudge(RewardModelJudge.Config(**{k: v for k, v in judge.items() if k != "name"}),
                                 JudgeContext(device="cpu"))
    for lines in (before, mine):  # scored in other batches here: float32 rounding apart, no more
        rescored = by_itself.scores([line["prompt"] for line in lines], [line["completion"] for line in lines])
        assert [line["score"] for line in lines] == pytest.approx(rescored, abs=1e-5, rel=0)
    by_itself.close()
    by_hand = [1.0 if m["score"] > i["score"] else 0.0 if m["score"] < i["score"] else 0.5 for m, i in zip(mine, before)]
    assert [m["outcome"] for m in mine] == by_hand
    assert result["win_rate"] == pytest.approx(sum(by_hand) / 8, abs=1e-12) and 0 <= result["lc_win_rate"] <= 1
    assert result["reward"] == pytest.approx(sum(m["score"] for m in mine) / 8, abs=1e-9)
    assert initial["judge"] == result["judge"] == judge


# ----------------------------------------------------------------------------------------------------------
# a pairwise judge: win rates, no reward


class FirstAlways(PairwiseJudge):
    """Prefers whichever completion it is shown first: pure position bias."""

    name = "first_always"

    def prefer(self, prompts, first, second):
        return [1.0] * len(first)


@hookimpl
def prefopt_register_judges():
    return [FirstAlways]


def test_a_pairwise_judge_asked_both_ways_cancels_its_position_bias(tmp_path, tiny_model_dir, tokenizer, pairs_dir):
    plugins = load_plugins(extra=[__name__])  # this module registers the judge
    path = write_bench(tmp_path, tiny_model_dir, pairs_dir, {"judge": {"name": "first_always"}, "num_prompts": 3,
                                                             "samples_per_prompt": 2, "max_new_tokens": 4})
    bench = load_bench(path, plugins)
    evaluator = evaluator_of(bench, plugins)
    initial = evaluator.evaluate(recipe_file(bench.initial_dir, bench.initial), initial=True)
    assert initial["reward"] is None and initial["win_rate"] is None and initial["kl"] == 0.0
    assert initial["sampling"]["seed"] == 0  # no task and no eval.seed: the bench's first seed
    run = bench.runs[0]
    save_model(run.dir, tokenizer, seed=1)
    result = evaluator.evaluate(recipe_file(run.dir, run.recipe), initial=False,
                                baseline=bench.initial_dir / COMPLETIONS_FILE)
    lines = read_lines(run.dir / COMPLETIONS_FILE)
    assert len(lines) == 6 and all(line["score"] is None and line["outcome"] == 0.5 for line in lines)
    assert result["reward"] is None and "reward/mean" not in result["metrics"]
    assert result["win_rate"] == 0.5 and result["lc_win_rate"] == pytest.approx(0.5, abs=1e-9)
    evaluator.close()


class Overconfident(PairwiseJudge):
    """Returns a number that is no probability."""

    name = "overconfident"

    def prefer(self, prompts, first, second):
        return [1.5] * len(first)


def test_a_judge_preference_outside_zero_to_one_is_a_one_line_error():
    from prefopt import JudgeConfig, JudgeContext
    from prefopt.errors import PrefoptError
    from prefopt.judged.evaluate import outcomes

    line = {"prompt_index": 0, "sample": 0, "prompt": "A film", "completion": " is fine.", "score": None}
    with pytest.raises(PrefoptError, match=r"^judge 'overconfident' returned 1\.5 at index 0; prefer\(\) must "
                                           r"return probabilities in \[0, 1\]"):
        outcomes([line], [line | {"completion": " is dull."}], Overconfident(JudgeConfig(), JudgeContext()))


# ----------------------------------------------------------------------------------------------------------
# what a bench recipe must say to be judged


def test_a_wrong_judge_is_a_one_line_error_naming_eval_judge(tmp_path, tiny_model_dir, pairs_dir, capsys):
    from prefopt.cli import main

    path = write_bench(tmp_path, tiny_model_dir, pairs_dir, {"judge": {"name": "functoin"}})
    with pytest.raises(RecipeError) as caught:
        load_bench(path)
    (problem,) = caught.value.problems
    assert problem.startswith("eval.judge.name: unknown judge 'functoin' (did you mean 'function'")
    assert main(["bench", str(path), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "eval.judge.name: unknown judge 'functoin'" in error
    assert not (tmp_path / "out").exists(), "nothing may run before the judge is known"

    # its options are checked against the judge's own Config
    path = write_bench(tmp_path, tiny_model_dir, pairs_dir, {"judge": {"name": "function", "fn": "a:b"}})
    with pytest.raises(RecipeError) as caught:
        load_bench(path)
    assert str(caught.value).endswith("eval.judge.function: required but missing; eval.judge.fn: unknown option of "
                                     "judge 'function'")


def test_data_that_is_no_task_needs_held_out_prompts_for_its_judge(tmp_path, tiny_model_dir, pairs_dir):
    path = write_bench(tmp_path, tiny_model_dir, pairs_dir, {"judge": VADER}, eval_split=None)
    with pytest.raises(RecipeError) as caught:
        load_bench(path)
    assert caught.value.problems == ["eval.judge judges completions of held-out prompts, and the base recipe (with "
                                     "the overrides) holds none: set data.eval_split, or leave out eval.judge"]
    # Neither a task nor a judge: nothing is judged (the rows hold training metrics), and that is no error.
    assert not load_bench(write_bench(tmp_path, tiny_model_dir, pairs_dir, {})).judged


def test_asking_for_more_prompts_than_the_held_out_rows_hold_is_a_one_line_error(tmp_path, tiny_model_dir,
                                                                                 pairs_dir):
    bench = load_bench(write_bench(tmp_path, tiny_model_dir, pairs_dir, {"judge": VADER, "num_prompts": 9}))
    with pytest.raises(PrefoptError, match=r"eval.num_prompts is 9, but .*test.* holds 4 distinct prompts; ask for "
                                           "fewer"):
        evaluator_of(bench).evaluate(recipe_file(bench.initial_dir, bench.initial), initial=True)


def test_a_changed_judge_or_sampling_setting_makes_the_evaluation_stale(tmp_path, tiny_model_dir, pairs_dir):
    from prefopt.bench.evaluate import options_record, recipe_digest
    from prefopt.bench.files import write_json
    from prefopt.bench.runner import _evaluation_current

    bench = load_bench(write_bench(tmp_path, tiny_model_dir, pairs_dir, {"judge": VADER}))
    text = dump_recipe(bench.initial)
    bench.initial_dir.mkdir(parents=True)
    write_json(bench.initial_dir / EVAL_FILE, {"recipe_sha256": recipe_digest(text),
                                               "options": options_record(bench.spec.eval, 0)})
    assert _evaluation_current(bench, bench.initial_dir, text)
    for change in ({"judge": {**VADER, "min_margin": 0.1}}, {"judge": VADER, "temperature": 0.7},
                   {"judge": VADER, "seed": 5}, {"judge": VADER, "batch_size": 8}):
        other = load_bench(write_bench(tmp_path, tiny_model_dir, pairs_dir, change))
        assert not _evaluation_current(other, bench.initial_dir, text), change


# ----------------------------------------------------------------------------------------------------------
# results: the win rates in rows, old rows still read, ranking without rewards


def test_rows_carry_the_win_rates_and_older_results_still_read(tmp_path):
    from prefopt.bench.results import METRICS, aggregate, read_results

    assert METRICS[:5] == ("reward", "kl", "length", "win_rate", "lc_win_rate")
    old = {"entry": "a", "seed": 0, **{m: 0.5 for m in METRICS if m not in ("win_rate", "lc_win_rate")}}
    write_jsonl(tmp_path / "results.jsonl", [old])
    (row,) = read_results(tmp_path)
    assert row["win_rate"] is None and row["lc_win_rate"] is None and row["reward"] == 0.5

    def rows(entry, reward, win_rates):
        return [{"entry": entry, "seed": seed, "reward": reward, "win_rate": w} for seed, w in enumerate(win_rates)]

    # no entry has a reward (a pairwise judge): ranked by mean win rate, aggregated over seeds
    records = aggregate(rows("a", None, [0.4, 0.6]) + rows("b", None, [0.7, 0.9]) + rows("c", None, [None]),
                        ["a", "b", "c"])
    assert [r["entry"] for r in records] == ["b", "a", "c"]
    assert records[0]["win_rate"].mean == pytest.approx(0.8) and records[0]["win_rate"].n == 2
    # with rewards, the reward ranks as before, whatever the win rates say
    records = aggregate(rows("a", 0.9, [0.1]) + rows("b", 0.1, [0.9]), ["a", "b"])
    assert [r["entry"] for r in records] == ["a", "b"]


# ----------------------------------------------------------------------------------------------------------
# one bench end to end on a plain file: 1 entry x 1 seed x 1 step, each run in its own process


def test_a_bench_on_a_plain_file_judges_every_run_against_the_initial_model(tmp_path, tiny_model_dir, pairs_dir,
                                                                           monkeypatch):
    from prefopt.cli import main

    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # main() sets it for --no-progress; give it back after
    path = write_bench(tmp_path, tiny_model_dir, pairs_dir, {"judge": VADER, "samples_per_prompt": 2,
                                                             "max_new_tokens": 12})
    assert main(["bench", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    initial = read_lines(out / "initial" / COMPLETIONS_FILE)
    mine = read_lines(out / "runs" / "moved" / "seed-0" / COMPLETIONS_FILE)
    assert len(initial) == len(mine) == 4 * 2  # every held-out prompt of test.jsonl, 2 samples each
    assert {line["prompt"] for line in mine} == {json.loads(row)["prompt"] for row in
                                                (pairs_dir / "test.jsonl").read_text().splitlines()}
    assert all(line["outcome"] is None and line["kl"] == 0.0 for line in initial)
    by_hand = [1.0 if m["score"] > i["score"] else 0.0 if m["score"] < i["score"] else 0.5
               for m, i in zip(mine, initial)]
    assert [line["outcome"] for line in mine] == by_hand
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["win_rate"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-12)
    assert 0 <= row["lc_win_rate"] <= 1 and row["reward"] == pytest.approx(sum(m["score"] for m in mine) / 8)
    assert json.loads((out / "initial" / EVAL_FILE).read_text())["judge"] == VADER
    assert (out / "leaderboard.md").is_file()


def test_a_damaged_baseline_completions_file_is_a_one_line_error(tmp_path):
    """Entries are compared with the initial model's completions: a torn line there is never read as whole."""
    from prefopt.bench.evaluate import _read_lines
    from prefopt.errors import PrefoptError

    path = tmp_path / COMPLETIONS_FILE
    path.write_text('{"prompt_index": 0, "sample": 0, "completion": " fine"}\n{"prompt_index": 1, "sam')
    with pytest.raises(PrefoptError, match=rf"^{tmp_path / COMPLETIONS_FILE} line 2: not a completion record"):
        _read_lines(path)
    assert _read_lines(tmp_path / "missing.jsonl") == []
