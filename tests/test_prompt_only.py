"""Prompt-only data (``data.format: prompt_only``) through the engine: the on-policy rounds algorithms train on
it, every run that trains on the data's responses refuses it in one line, held-out prompts give no pair metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import PAIRS, write_jsonl
from helpers import metric_lines, one_line_error, online_tree, round_records, tiny_recipe, train_tree

PROMPTS = [prompt for prompt, _, _ in PAIRS]


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])


@pytest.fixture()
def prompts_dir(tmp_path) -> Path:
    """Prompt-only train and test splits."""
    d = tmp_path / "prompts"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"prompt": p} for p in PROMPTS])
    write_jsonl(d / "test.jsonl", [{"prompt": p} for p in PROMPTS[:4]])
    return d


def _prefopt_error(tree) -> str:
    from prefopt.errors import PrefoptError

    with pytest.raises(PrefoptError) as caught:
        train_tree(tree)
    message = str(caught.value)
    assert "\n" not in message
    return message


def _validate_error(tree, tmp_path, capsys) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return one_line_error(capsys, ["validate", str(path)])


# --- the rounds algorithms train on it -----------------------------------------------------------------


def test_online_dpo_trains_two_rounds_on_the_files_prompts(tiny_model_dir, prompts_dir, tmp_path, capsys):
    out = tmp_path / "run"
    tree = online_tree(tiny_model_dir, prompts_dir, out, {"name": "online_dpo", "rounds": 2},
                       data={"eval_split": "test"}, eval={"at_start": True, "task_metrics": False})
    summary = train_tree(tree)
    printed = capsys.readouterr().out
    assert summary["steps"] == 2
    assert "data: " + str(prompts_dir) + " (split train): 12 prompts" in printed
    # the held-out prompts have no pairs: said once, and no pair metric is computed at the start or the end
    assert printed.count("prompt-only rows hold no pairs, so no held-out pair metrics") == 1
    assert summary["eval_pairs"] == 0 and summary["eval_end"] == {}
    assert "eval  step" not in printed  # no empty evaluation lines
    metrics = metric_lines(out)
    assert not any(key.startswith("eval/") for m in metrics for key in m)
    assert sorted(m["step"] for m in metrics if "loss" in m) == [1, 2]

    rounds = round_records(out)
    assert len(rounds) == 2 and all(len(records) == 4 for records in rounds)  # batch_size prompts per round
    records = [r for records in rounds for r in records]
    # the rounds' prompts are the file's, each with its own row, and distinct until all were used
    assert all(r["prompt"] == PROMPTS[r["row"]] for r in records)
    assert len({r["row"] for r in records}) == 8
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert all(tuple(r["prompt_ids"]) == tuple(tok(r["prompt"]).input_ids) for r in records)
    assert all(len(r["completions"]) == 2 for r in records)
    assert any(r["chosen"] is not None for r in records)


def test_held_out_pairs_beside_training_prompts_are_scored(tiny_model_dir, tmp_path):
    import datasets

    # a saved DatasetDict keeps each split's columns (datasets reads a directory of JSON files with the first
    # file's columns, and cannot cast pairs to a prompts-only train.jsonl's)
    d = str(tmp_path / "mixed")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]),
        "test": datasets.Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS[:4]]),
    }).save_to_disk(d)
    out = tmp_path / "run"
    summary = train_tree(online_tree(tiny_model_dir, d, out, {"name": "online_dpo", "rounds": 1},
                                 data={"eval_split": "test"}))
    assert summary["eval_pairs"] == 4
    assert "eval/rewards/accuracies" in summary["eval_end"]
    assert all(r["prompt"] == PROMPTS[r["row"]] for r in round_records(out)[0])


def test_conversational_prompts_are_sampled_after_the_chat_template(tiny_model_dir, tmp_path):
    messages = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": m} for m in messages])
    out = tmp_path / "run"
    train_tree(online_tree(tiny_model_dir, data, out, {"name": "iterative_dpo", "rounds": 1, "samples_per_prompt": 2},
                       data={"format": "prompt_only", "max_length": 96, "max_prompt_length": 64}))
    [records] = round_records(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert sorted(r["row"] for r in records) == [0, 1, 2, 3]
    for r in records:
        expected = tok.apply_chat_template(messages[r["row"]], add_generation_prompt=True, tokenize=False)
        assert tok.decode(r["prompt_ids"]) == expected
        assert r["prompt"] == messages[r["row"]]  # the judge reads the messages as the file wrote them


def test_explicit_prompt_only_validates_for_the_rounds_algorithms(tiny_model_dir, prompts_file, tmp_path):
    from prefopt.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    for name in ("online_dpo", "iterative_dpo"):
        tree = online_tree(tiny_model_dir, prompts_file, tmp_path / name, {"name": name, "rounds": 1},
                           data={"format": "prompt_only"})
        path.write_text(yaml.safe_dump(tree))
        assert load_recipe(path).data.format == "prompt_only"


def test_too_few_prompts_for_a_batch_say_prompts(tiny_model_dir, prompts_file, tmp_path):
    tree = online_tree(tiny_model_dir, prompts_file, tmp_path / "run", {"name": "online_dpo", "rounds": 1},
                       data={"max_train_pairs": 3})
    message = _prefopt_error(tree)
    assert "3 prompts usable, fewer than train.batch_size (4)" in message


# --- everything else refuses it --------------------------------------------------------------------------


def test_a_plain_loss_run_refuses_prompt_only_data_in_one_line(tiny_model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "dpo"
    message = _prefopt_error(tiny_recipe(tiny_model_dir, prompts_file, out))
    assert f"{prompts_file} (split train)" in message
    assert "data.format=auto found no value in columns 'chosen', 'rejected', 'completion'; the columns are prompt" \
        in message
    assert not (out / "checkpoints").exists()
    capsys.readouterr()  # what reading the file printed
    # through the CLI too, and named in `prefopt validate` when the recipe says prompt_only itself
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, prompts_file, out)))
    assert "data.format=auto" in one_line_error(capsys, ["train", str(path), "--no-progress"])
    message = _validate_error(tiny_recipe(tiny_model_dir, prompts_file, out, data={"format": "prompt_only"}),
                              tmp_path, capsys)
    assert "data.format=prompt_only" in message and "this recipe trains on the data's responses" in message


def test_an_explicit_prompt_only_format_is_refused_on_preference_data_too(tiny_model_dir, pairs_file, tmp_path):
    # the format, not the file, decides: prompt_only reads only the prompts, which a loss cannot train on
    tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "dpo", data={"format": "prompt_only"})
    message = _prefopt_error(tree)
    assert "data.format=prompt_only" in message and f"{pairs_file} (split train)" in message


def test_an_algorithm_that_trains_on_the_datas_responses_refuses_it(tiny_model_dir, prompts_file, tmp_path, capsys):
    tree = tiny_recipe(tiny_model_dir, prompts_file, tmp_path / "sdpo", algorithm={"name": "stepwise", "stages": 2},
                       data={"format": "prompt_only"})
    assert "algorithm 'stepwise' trains on the data's responses" in _validate_error(tree, tmp_path, capsys)


# --- held-out prompts ---------------------------------------------------------------------------------------


def test_an_offline_run_with_prompt_only_held_out_data_trains_without_pair_metrics(tiny_model_dir, tmp_path, capsys):
    # one directory of JSON files: datasets gives the test split the train split's columns, null responses
    d = tmp_path / "mixed"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    write_jsonl(d / "test.jsonl", [{"prompt": p} for p in PROMPTS[:4]])
    summary = train_tree(tiny_recipe(tiny_model_dir, d, tmp_path / "dpo", data={"eval_split": "test"},
                                 eval={"at_start": True, "task_metrics": False}))
    assert "(split test): prompt-only rows hold no pairs" in capsys.readouterr().out
    assert summary["steps"] == 3 and summary["eval_pairs"] == 0 and summary["eval_end"] == {}
