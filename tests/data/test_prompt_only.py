"""Prompt-only data (``data.format: prompt_only``): detected, read, counted and tokenized like the prompts
of preference data, and never batched for a loss."""

from __future__ import annotations

import datasets
import pytest

from prefopt.forward.batching import collate_pairs
from prefopt.data import PreferenceExample, to_examples, tokenize_examples
from prefopt.data.tokenize import PROMPT_TOO_LONG
from prefopt.errors import PrefoptError
from helpers import assistant, user

COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
SOURCE = "prompts.jsonl (split train)"
SETTINGS = dict(max_length=64, max_prompt_length=None, append_eos=True, invalid_rows="error", source=SOURCE)


def examples_of(rows: list[dict], fmt: str = "auto", columns: dict = COLUMNS):
    return to_examples(datasets.Dataset.from_list(rows), columns, fmt, SOURCE)


def tokenized(rows: list[dict], tokenizer, fmt: str = "auto", **overrides):
    examples, skipped, first = examples_of(rows, fmt)
    return tokenize_examples(examples, tokenizer, **{**SETTINGS, **overrides}, skipped=skipped,
                             first_skipped_row=first)


# --- reading rows ------------------------------------------------------------------------------------


def test_auto_detects_rows_with_a_prompt_and_no_responses():
    # other columns (an id, a label) do not make rows preference data; only chosen/rejected/completion do
    examples, skipped, _ = examples_of([{"prompt": "2+2?", "id": 7}, {"prompt": "Sky?", "id": 8}])
    assert examples == [PreferenceExample(0, "2+2?", None, None), PreferenceExample(1, "Sky?", None, None)]
    assert all(example.prompt_only for example in examples) and skipped == {}


@pytest.mark.parametrize("column", ["chosen", "rejected", "completion"])
def test_auto_does_not_take_rows_with_a_response_column_for_prompt_only(column):
    # one response column is incomplete preference data: auto asks for the missing column instead
    with pytest.raises(PrefoptError, match="no column '(chosen|rejected)'.*data.columns"):
        examples_of([{"prompt": "p", column: "c"}])


def test_auto_takes_response_columns_with_no_value_for_absent():
    # what a train.jsonl of prompts gets beside a test.jsonl of pairs in one directory
    examples, _, _ = examples_of([{"prompt": "p", "chosen": None, "rejected": None}] * 2)
    assert [example.prompt_only for example in examples] == [True, True]
    # one value is enough to make them preference rows (the others then count as unusable)
    rows = [{"prompt": "p", "chosen": None, "rejected": None}, {"prompt": "q", "chosen": "c", "rejected": "r"}]
    examples, skipped, _ = examples_of(rows)
    assert examples == [PreferenceExample(1, "q", "c", "r")] and skipped == {"empty value in column 'chosen'": 1}


def test_explicit_prompt_only_reads_only_the_prompt_of_preference_rows():
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "q", "chosen": "c", "rejected": "r"}]
    examples, _, _ = examples_of(rows, "prompt_only")
    assert examples == [PreferenceExample(0, "p", None, None), PreferenceExample(1, "q", None, None)]
    # the same rows under auto are pairs
    assert examples_of(rows)[0][0] == PreferenceExample(0, "p", "c", "r")


def test_a_renamed_prompt_column_is_read():
    examples, _, _ = examples_of([{"question": "p"}], "auto", {**COLUMNS, "prompt": "question"})
    assert examples == [PreferenceExample(0, "p", None, None)]


def test_conversational_prompts_keep_their_messages_without_the_null_keys_arrow_adds():
    # the second row's extra key makes Arrow give every message a 'name' field, None where absent
    rows = [{"prompt": [user("hi")]}, {"prompt": [{**user("yo"), "name": "x"}]}]
    examples, _, _ = examples_of(rows)
    assert [example.prompt for example in examples] == [[user("hi")], [{**user("yo"), "name": "x"}]]
    assert examples[0].chosen is None and examples[0].rejected is None


def test_unusable_prompts_are_counted_by_reason_with_their_first_row():
    rows = [{"prompt": "ok"}, {"prompt": ""}, {"prompt": None}, {"prompt": "   "}, {"prompt": "fine"}]
    examples, skipped, first = examples_of(rows, "prompt_only")
    assert [example.row for example in examples] == [0, 4]
    assert skipped == {"empty value in column 'prompt'": 3} and first == {"empty value in column 'prompt'": 1}

    rows = [{"prompt": [user("ok")]}, {"prompt": []}, {"prompt": [{"text": "no role"}]}, {"prompt": [user(" ")]}]
    examples, skipped, first = examples_of(rows)
    assert [example.row for example in examples] == [0]
    assert skipped == {
        "empty value in column 'prompt'": 2,
        "column 'prompt' is not a list of role/content messages": 1,
    }
    assert first == {"empty value in column 'prompt'": 1, "column 'prompt' is not a list of role/content messages": 2}


def test_prompts_that_are_not_text_are_counted():
    _, skipped, first = examples_of([{"prompt": 3}, {"prompt": 4}], "prompt_only")
    assert skipped == {"column 'prompt' is not text": 2} and first == {"column 'prompt' is not text": 0}


def test_a_missing_prompt_column_names_it_and_the_override():
    with pytest.raises(PrefoptError) as caught:
        examples_of([{"question": "p"}], "prompt_only")
    message = str(caught.value)
    assert "\n" not in message and SOURCE in message
    assert "'prompt'" in message and "data.columns.prompt=<name>" in message


# --- tokenizing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer_name", ["smollm_tokenizer", "bos_tokenizer"])
def test_text_prompts_get_the_ids_a_standard_row_gives_its_prompt(tokenizer_name, request):
    tok = request.getfixturevalue(tokenizer_name)
    prompt = "The movie was"
    [only] = tokenized([{"prompt": prompt}], tok).pairs
    [pair] = tokenized([{"prompt": prompt, "chosen": " good", "rejected": " bad"}], tok).pairs
    assert only.prompt_ids == pair.prompt_ids
    assert only.chosen_ids == only.rejected_ids == ()  # no responses, and no EOS appended to nothing


def test_conversational_prompts_get_the_ids_a_conversational_row_gives_its_prompt(smollm_tokenizer):
    tok = smollm_tokenizer
    prompt = [{"role": "system", "content": "Be brief."}, user("Name a colour.")]
    pairs = tokenized([{"prompt": prompt}], tok)
    preference = tokenized([{"prompt": prompt, "chosen": [assistant("Red.")], "rejected": [assistant("No.")]}], tok)
    assert pairs.pairs[0].prompt_ids == preference.pairs[0].prompt_ids
    # the chat template ran, ending with the generation prompt the sampler continues from
    expected = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert tok.decode(pairs.pairs[0].prompt_ids) == expected
    assert pairs.prompt_only and not preference.prompt_only
    assert pairs.describe() == "1 prompts" and preference.describe() == "1 pairs"


def test_prompts_are_cut_from_the_left_and_must_leave_room_for_a_response(smollm_tokenizer):
    tok = smollm_tokenizer
    long_prompt = "one two three four five six seven eight nine ten"
    [pair] = tokenized([{"prompt": long_prompt}], tok, max_prompt_length=3).pairs
    assert pair.prompt_ids == tuple(tok(long_prompt).input_ids[-3:])
    pairs = tokenized([{"prompt": "short"}, {"prompt": long_prompt}], tok, max_length=4, invalid_rows="skip")
    assert [p.row for p in pairs.pairs] == [0]
    assert pairs.skipped == {PROMPT_TOO_LONG: 1} and pairs.first_skipped_row == {PROMPT_TOO_LONG: 1}


def test_invalid_rows_error_names_the_first_unusable_row(smollm_tokenizer):
    with pytest.raises(PrefoptError) as caught:
        tokenized([{"prompt": "ok"}, {"prompt": ""}, {"prompt": ""}], smollm_tokenizer)
    message = str(caught.value)
    assert "\n" not in message
    assert "row 1 (counting from 0) is unusable: empty value in column 'prompt'" in message
    assert "data.invalid_rows=skip" in message


def test_the_fingerprint_follows_the_prompts(smollm_tokenizer):
    one = tokenized([{"prompt": "a"}, {"prompt": "b"}], smollm_tokenizer).fingerprint
    assert one == tokenized([{"prompt": "a"}, {"prompt": "b"}], smollm_tokenizer).fingerprint
    assert one != tokenized([{"prompt": "a"}, {"prompt": "c"}], smollm_tokenizer).fingerprint


def test_prompt_only_pairs_are_never_batched_for_a_loss(smollm_tokenizer):
    pairs = tokenized([{"prompt": "a"}, {"prompt": "b"}], smollm_tokenizer).pairs
    with pytest.raises(ValueError, match="prompt-only"):
        collate_pairs(pairs, [0, 1], pad_id=2)
