"""Named eval sets (``eval.sets``) and the token metrics of an evaluation (``logits/*``, ``entropy``).

Each named set is tokenized as the held-out split is, scored with its own reference, and logged under its name:
its values are those of the same pairs scored alone as ``data.eval_split``. The held-out split still logs
``eval/...``. ``logits/chosen``, ``logits/rejected`` and ``entropy`` equal a float64 computation from the
model's full logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import PAIRS, write_jsonl
from helpers import one_line_error, tiny_recipe, validated
from prefopt import engine
from prefopt.errors import RecipeError

TRAIN = {"max_steps": 2, "eval_every": 1}
EVAL = {"at_start": True, "task_metrics": False, "batch_size": 3}


def standard(rows):
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows]


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    """train (12 pairs), test (the first 4), validation (the last 5, reversed): three splits of one folder; and
    validation's rows under other column names, in a file of their own."""
    folder = tmp_path / "prefs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", standard(PAIRS))
    write_jsonl(folder / "test.jsonl", standard(PAIRS[:4]))
    other = list(reversed(PAIRS[-5:]))
    write_jsonl(folder / "validation.jsonl", standard(other))
    write_jsonl(tmp_path / "renamed.jsonl", [{"q": p, "good": c, "bad": r} for p, c, r in other])
    return folder


def eval_lines(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> every eval/ value logged at that step."""
    found: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        found.setdefault(record["step"], {}).update({k: v for k, v in record.items() if k.startswith("eval/")})
    return found


SETS = ("other", "renamed", "same", "again")


def under(values: dict[str, float], prefix: str) -> dict[str, float]:
    """The metrics logged under ``prefix`` (eval/ or eval/<name>/), by their own names; under eval/, the
    held-out split's alone."""
    names = {k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)}
    return {k: v for k, v in names.items() if prefix != "eval/" or k.split("/")[0] not in SETS}


def test_two_named_sets_log_under_their_names_the_values_of_each_scored_alone(tiny_model_dir, data_dir, tmp_path):
    sets = {
        "other": {"path": str(data_dir), "split": "validation"},
        "renamed": {"path": str(tmp_path / "renamed.jsonl"), "split": "train",
                    "columns": {"prompt": "q", "chosen": "good", "rejected": "bad"}},
        "same": {"path": str(data_dir), "split": "test", "max_pairs": 3},
    }
    both = tiny_recipe(tiny_model_dir, data_dir, tmp_path / "both", data={"eval_split": "test", "max_eval_pairs": 3},
                       train=TRAIN, eval={**EVAL, "sets": sets})
    summary = engine.train(validated(both), show_progress=False)
    alone = tiny_recipe(tiny_model_dir, data_dir, tmp_path / "alone", data={"eval_split": "validation"}, train=TRAIN,
                        eval=EVAL)
    engine.train(validated(alone), show_progress=False)

    logged, other_alone = eval_lines(tmp_path / "both"), eval_lines(tmp_path / "alone")
    assert sorted(logged) == sorted(other_alone) == [0, 1, 2]  # the baseline, step 1, the end
    for step, values in logged.items():
        held_out = under(values, "eval/")
        assert "eval/rewards/accuracies" in values and "entropy" in held_out and "logits/chosen" in held_out
        for name, expected in (("other", under(other_alone[step], "eval/")), ("renamed", under(values, "eval/other/")),
                               ("same", held_out)):
            got = under(values, f"eval/{name}/")
            assert got.keys() == expected.keys(), name
            for key, value in expected.items():
                # the same pairs through the same float32 forwards: equal but for the summation order of batches
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, name, key)
    assert summary["eval_sets"] == {"other": 5, "renamed": 5, "same": 3}
    caches = summary["reference"]["caches"]
    assert [c.get("eval_set") for c in caches] == [None, None, "other", "renamed", "same"]
    # the same pairs have the same cache, whichever split or set they come from
    assert caches[1]["path"] == caches[4]["path"] and caches[2]["path"] == caches[3]["path"]


@pytest.mark.parametrize("reference", [{"kind": "live"}, {"sync": {"mode": "hard", "every": 2}}])
def test_a_set_is_scored_against_a_live_or_following_reference_as_the_held_out_split_is(
        tiny_model_dir, data_dir, tmp_path, reference):
    again = {"again": {"path": str(data_dir), "split": "test"}}
    tree = tiny_recipe(tiny_model_dir, data_dir, tmp_path / "run", data={"eval_split": "test"}, reference=reference,
                       train={"max_steps": 3}, eval={**EVAL, "sets": again})
    end = engine.train(validated(tree), show_progress=False)["eval_end"]  # a step after the sync at 2
    held_out, again = under(end, "eval/"), under(end, "eval/again/")
    assert held_out.keys() == again.keys() and held_out["rewards/margins"] != 0
    for key, value in held_out.items():
        assert again[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key  # the same batches: the same numbers


def test_a_set_of_prompts_is_left_out_with_a_note(tiny_model_dir, data_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p, _, _ in PAIRS[:3]])
    tree = tiny_recipe(tiny_model_dir, data_dir, tmp_path / "run", train={"max_steps": 1},
                       eval={"sets": {"prompts": {"path": str(prompts), "split": "train"}}})
    summary = engine.train(validated(tree), show_progress=False)
    assert summary["eval_end"] == {} and "eval_sets" not in summary
    out = capsys.readouterr().out
    assert "eval.sets.prompts: " in out and "eval.sets.prompts.path to preference data" in out


@pytest.mark.parametrize("problem, key", [
    ({"path": "missing.jsonl"}, "eval.sets.ood.path"),
    ({"columns": {"chosen": "best"}}, "eval.sets.ood.columns.chosen"),
    ({"split": "dev"}, "eval.sets.ood.split"),
])
def test_a_bad_eval_set_is_one_line_naming_its_key(tiny_model_dir, data_dir, tmp_path, capsys, problem, key):
    spec = {"path": str(data_dir), "split": "test", **problem}
    if problem.get("path") == "missing.jsonl":
        spec["path"] = str(tmp_path / "missing.jsonl")
    tree = tiny_recipe(tiny_model_dir, data_dir, tmp_path / "run", eval={"sets": {"ood": spec}})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(tree))  # JSON is YAML
    err = one_line_error(capsys, ["train", str(recipe), "--no-progress"])
    assert key in err, err
    assert "data.path" not in err and "data.columns" not in err and "data.eval_split" not in err, err


@pytest.mark.parametrize("name", ["rewards", "a/b", "samples"])
def test_a_set_name_that_would_clash_in_metric_keys_is_refused(tiny_model_dir, data_dir, tmp_path, name):
    tree = tiny_recipe(tiny_model_dir, data_dir, tmp_path / "run",
                       eval={"sets": {name: {"path": str(data_dir), "split": "test"}}})
    with pytest.raises(RecipeError, match=r"eval\.sets: set name"):
        validated(tree)


def test_logits_and_entropy_equal_a_float64_computation_from_the_full_logits(tiny_model_dir, data_dir, tmp_path):
    tree = tiny_recipe(tiny_model_dir, data_dir, tmp_path / "run", data={"eval_split": "test"},
                       eval={"batch_size": 3, "at_start": False, "task_metrics": False,
                             "sets": {"again": {"path": str(data_dir), "split": "test"}}})
    run = engine.setup(validated(tree), show_progress=False)
    train_step_values = engine.train_step(run, 0)  # weights that are not the initial ones
    assert "entropy" not in train_step_values and "logits/chosen" not in train_step_values  # evaluation only
    values = engine.evaluate_pairs(run)

    model = run.accelerator.unwrap_model(run.policy)
    expected = full_logits_metrics(model, run.eval_pairs.pairs, run.tokenizer.pad_token_id)
    for key, value in expected.items():
        # float32 chunks against float64: entropies of about ln(49152) = 10.8, logit means of about 1e-2, over
        # 40-odd tokens; float32 rounding of each token's value is ~1e-6 of it
        assert values[f"eval/{key}"] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        assert values[f"eval/again/{key}"] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def full_logits_metrics(model, pairs, pad_id: int) -> dict[str, float]:
    """TRL's logits/chosen, logits/rejected and entropy, in float64 from each sequence's full logits."""
    import copy

    reference = copy.deepcopy(model).double().eval()
    sums = {"logits/chosen": 0.0, "logits/rejected": 0.0, "entropy": 0.0}
    tokens = {"chosen": 0, "rejected": 0}
    with torch.no_grad():
        for pair in pairs:
            for side, response in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
                ids = torch.tensor([list(pair.prompt_ids) + list(response)])
                logits = reference(input_ids=ids).logits[0, :-1].double()
                predicting = logits[len(pair.prompt_ids) - 1 :]  # the positions that predict a response token
                logp = torch.log_softmax(predicting, dim=-1)
                sums[f"logits/{side}"] += float(predicting.mean(-1).sum())
                sums["entropy"] += float(-(logp.exp() * logp).sum(-1).sum())
                tokens[side] += len(response)
    return {"logits/chosen": sums["logits/chosen"] / tokens["chosen"],
            "logits/rejected": sums["logits/rejected"] / tokens["rejected"],
            "entropy": sums["entropy"] / (tokens["chosen"] + tokens["rejected"])}


def test_two_processes_score_each_set_and_stop_as_one_process_does(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """Under DDP each process scores a shard of each set (3 pairs split 2 + 1, 5 split 3 + 2); the sums are
    gathered, so every value is the one process's, and early stopping on a set's metric stops both processes at
    the step one process stops at."""
    import os
    import subprocess
    import sys

    import yaml

    def tree(out: Path) -> dict:
        return tiny_recipe(
            tiny_model_dir, data_dir, out, data={"eval_split": "test", "max_eval_pairs": 3},
            train={"micro_batch_size": 1, "max_steps": 3, "eval_every": 1},
            eval={**EVAL, "batch_size": 1, "sets": {"five": {"path": str(data_dir), "split": "validation"}},
                  "early_stopping": {"metric": "eval/five/loss", "patience": 1, "min_delta": 1.0}})

    recipe, cache = tmp_path / "two.yaml", tmp_path / "cache"
    recipe.write_text(yaml.safe_dump(tree(tmp_path / "two")))
    env = {**os.environ, "PREFOPT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    launcher = str(Path(sys.executable).with_name("accelerate"))
    config = Path(__file__).parent.parent / "recipes" / "accelerate" / "ddp_cpu.yaml"
    done = subprocess.run([launcher, "launch", "--config_file", str(config), "-m", "prefopt.cli", "train",
                           str(recipe), "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.setenv("PREFOPT_CACHE", str(cache))
    one = engine.train(validated(tree(tmp_path / "one")), show_progress=False)

    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["stopped_early"]["step"] == one["stopped_early"]["step"] == 2
    two_logged, one_logged = eval_lines(tmp_path / "two"), eval_lines(tmp_path / "one")
    assert sorted(two_logged) == sorted(one_logged) == [0, 1, 2]
    for step, values in one_logged.items():
        assert any(key.startswith("eval/five/") for key in values)
        assert two_logged[step].keys() == values.keys()
        for key, value in values.items():
            # 2 processes' shards of the same pairs in other batches: float32 rounding of sums of ~70
            assert two_logged[step][key] == pytest.approx(value, rel=1e-5, abs=1e-5), (step, key)
    tokens = [[r.get("num_tokens") for r in map(json.loads, (tmp_path / run / "metrics.jsonl").open()) if "loss" in r]
              for run in ("two", "one")]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 2


def test_token_stats_with_gradients_match_those_without_and_leave_the_gradients_alone(tiny_model, monkeypatch):
    """With gradients on, each chunk is checkpointed and recomputed in backward; its stats are taken once, in the
    forward, and change neither the log-probs nor the gradients."""
    from prefopt.data.types import TokenizedPair
    from prefopt.forward import logprobs
    from prefopt.forward.batching import collate_pairs
    from prefopt.forward.logprobs import sequence_logps

    original, calls = logprobs._token_stats, []
    monkeypatch.setattr(logprobs, "_token_stats", lambda *args: calls.append(1) or original(*args))

    generator = torch.Generator().manual_seed(0)
    ids = lambda n: tuple(torch.randint(3, 400, (n,), generator=generator).tolist())  # noqa: E731
    pairs = [TokenizedPair(i, ids(5 + i), ids(4 + 2 * i), ids(7 - i)) for i in range(3)]
    batch = collate_pairs(pairs, [0, 1, 2], pad_id=2)
    with torch.no_grad():
        expected = sequence_logps(tiny_model, batch, chunk_size=5, token_stats=True)

    def gradients(token_stats: bool):
        tiny_model.zero_grad(set_to_none=True)
        result = sequence_logps(tiny_model, batch, chunk_size=5, token_stats=token_stats)
        result.sums.sum().backward()
        return result, [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]

    chunks = -(-int(batch.response_mask[:, 1:].sum()) // 5)
    assert len(calls) == chunks
    with_stats, grads = gradients(True)
    assert len(calls) == 2 * chunks  # not again when backward recomputed the chunks
    _, plain_grads = gradients(False)
    assert torch.equal(with_stats.entropy_sums, expected.entropy_sums)
    assert torch.equal(with_stats.mean_logit_sums, expected.mean_logit_sums)
    assert not with_stats.entropy_sums.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
