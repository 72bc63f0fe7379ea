"""to_examples: each format normalizes to PreferenceExample; unusable rows are counted, not raised."""

from __future__ import annotations

import datasets
import pytest

from prefopt.data import PreferenceExample, to_examples
from prefopt.errors import PrefoptError
from helpers import assistant, user

COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
SOURCE = "prefs.jsonl (split train)"


def examples_of(rows: list[dict], fmt: str = "auto", columns: dict = COLUMNS):
    return to_examples(datasets.Dataset.from_list(rows), columns, fmt, SOURCE)


def format_error(rows: list[dict], fmt: str = "auto", columns: dict = COLUMNS) -> str:
    with pytest.raises(PrefoptError) as caught:
        examples_of(rows, fmt, columns)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- each format ----------------------------------------------------------------------------------


def test_standard_rows_keep_their_text_and_row_numbers():
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "Sky?", "chosen": "blue", "rejected": "red"},
    ]
    examples, skipped, first = examples_of(rows, "standard")
    assert examples == [PreferenceExample(0, "2+2?", "4", "5"), PreferenceExample(1, "Sky?", "blue", "red")]
    assert skipped == first == {}


def test_columns_can_be_renamed():
    rows = [{"question": "2+2?", "good": "4", "bad": "5"}]
    examples, _, _ = examples_of(
        rows, "standard", {"prompt": "question", "chosen": "good", "rejected": "bad"}
    )
    assert examples == [PreferenceExample(0, "2+2?", "4", "5")]


def test_conversational_rows_keep_their_messages():
    rows = [{"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("go away")]}]
    examples, _, _ = examples_of(rows, "conversational")
    assert examples == [PreferenceExample(0, [user("hi")], [assistant("hello")], [assistant("go away")])]


def test_conversational_drops_the_null_keys_arrow_adds():
    # the second message's extra key makes Arrow give every message a 'name' field, None where absent
    rows = [
        {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [{**assistant("b"), "name": "x"}]}
    ]
    examples, _, _ = examples_of(rows, "conversational")
    assert examples[0].prompt == [user("hi")] and examples[0].chosen == [assistant("a")]
    assert examples[0].rejected == [{**assistant("b"), "name": "x"}]


def test_conversational_text_prompt_becomes_a_user_message_and_repeated_prompts_are_cut():
    # the HuggingFaceH4/ultrafeedback_binarized shape: a text prompt, responses that repeat it
    rows = [
        {
            "prompt": "hi",
            "chosen": [user("hi"), assistant("hello")],
            "rejected": [user("hi"), assistant("no")],
        }
    ]
    examples, _, _ = examples_of(rows, "conversational")
    assert examples == [PreferenceExample(0, [user("hi")], [assistant("hello")], [assistant("no")])]


def test_implicit_prompt_text_splits_at_the_longest_common_prefix():
    rows = [{"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: red"}]
    examples, _, _ = examples_of(rows, "implicit_prompt")
    assert examples == [PreferenceExample(0, "Q: sky? A: ", "blue", "red")]


def test_implicit_prompt_messages_split_at_the_first_differing_message():
    chosen = [user("hi"), assistant("hello"), user("bye"), assistant("see you")]
    rejected = [user("hi"), assistant("hello"), user("bye"), assistant("whatever")]
    examples, _, _ = examples_of([{"chosen": chosen, "rejected": rejected}], "implicit_prompt")
    assert examples == [PreferenceExample(0, chosen[:3], [assistant("see you")], [assistant("whatever")])]


@pytest.mark.parametrize(
    "row,expected",
    [
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, PreferenceExample(0, "p", "c", "r")),
        (
            {"prompt": [user("p")], "chosen": [assistant("c")], "rejected": [assistant("r")]},
            PreferenceExample(0, [user("p")], [assistant("c")], [assistant("r")]),
        ),
        ({"chosen": "p c", "rejected": "p r"}, PreferenceExample(0, "p ", "c", "r")),
        (
            {"chosen": [user("p"), assistant("c")], "rejected": [user("p"), assistant("r")]},
            PreferenceExample(0, [user("p")], [assistant("c")], [assistant("r")]),
        ),
    ],
    ids=["standard", "conversational", "implicit-text", "implicit-messages"],
)
def test_auto_detects_the_format_from_the_first_row(row, expected):
    examples, _, _ = examples_of([row])
    assert examples == [expected]


# --- unusable rows are counted by reason -------------------------------------------------------------


def test_unusable_rows_are_counted_with_their_first_row():
    rows = [
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"prompt": "p", "chosen": None, "rejected": "r"},
        {"prompt": "p", "chosen": "   ", "rejected": "r"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "", "chosen": "c", "rejected": "r"},
    ]
    examples, skipped, first = examples_of(rows, "standard")
    assert [example.row for example in examples] == [0]
    assert skipped == {
        "empty value in column 'chosen'": 2,
        "same value in columns 'chosen' and 'rejected'": 1,
        "empty value in column 'prompt'": 1,
    }
    assert first == {
        "empty value in column 'chosen'": 1,
        "same value in columns 'chosen' and 'rejected'": 3,
        "empty value in column 'prompt'": 4,
    }


def test_unusable_conversational_rows_are_counted():
    rows = [
        {"prompt": [user("p")], "chosen": [assistant("c")], "rejected": [assistant("c")]},
        {"prompt": [user("p")], "chosen": [], "rejected": [assistant("r")]},
        {"prompt": [user("p")], "chosen": [assistant("")], "rejected": [assistant("r")]},
    ]
    examples, skipped, first = examples_of(rows, "conversational")
    assert examples == []
    assert skipped == {
        "same value in columns 'chosen' and 'rejected'": 1,
        "empty value in column 'chosen'": 2,
    }
    assert first == {"same value in columns 'chosen' and 'rejected'": 0, "empty value in column 'chosen'": 1}


def test_unusable_implicit_prompt_rows_are_counted():
    rows = [
        {"chosen": "abc", "rejected": "xyz"},  # nothing shared: no prompt
        {"chosen": "Q: x", "rejected": "Q: x and more"},  # chosen is all prompt
        {"chosen": "Q: x", "rejected": "Q: x"},
    ]
    examples, skipped, _ = examples_of(rows, "implicit_prompt")
    assert examples == []
    assert skipped == {
        "no shared prompt at the start of columns 'chosen' and 'rejected'": 1,
        "column 'chosen' has nothing after the prompt it shares with the other": 1,
        "same value in columns 'chosen' and 'rejected'": 1,
    }


def test_responses_must_start_with_an_assistant_message():
    rows = [
        {"prompt": [user("p")], "chosen": [user("c")], "rejected": [assistant("r")]},
    ]
    _, skipped, _ = examples_of(rows, "conversational")
    assert skipped == {"column 'chosen' does not start with an assistant message": 1}
    # two conversations that part at a user turn leave no assistant answer to the shared prompt
    rows = [
        {"chosen": [user("p"), assistant("a"), user("x")], "rejected": [user("p"), assistant("a"), user("y")]}
    ]
    _, skipped, _ = examples_of(rows, "implicit_prompt")
    assert skipped == {"column 'chosen' does not continue the shared prompt with an assistant message": 1}


# --- errors ------------------------------------------------------------------------------------


def test_a_missing_column_names_it_the_source_the_columns_and_the_override():
    message = format_error([{"prompt": "p", "good": "c", "rejected": "r"}], "standard")
    assert "'chosen'" in message and SOURCE in message and "prompt, good, rejected" in message
    assert "data.columns.chosen=<name>" in message


def test_a_missing_prompt_column_is_an_error_when_the_format_needs_one():
    message = format_error([{"chosen": "c", "rejected": "r"}], "standard")
    assert "'prompt'" in message and "data.columns.prompt=<name>" in message


def test_auto_does_not_hide_a_misnamed_prompt_column():
    columns = {**COLUMNS, "prompt": "question"}
    message = format_error([{"prompt": "p", "chosen": "c", "rejected": "r"}], "auto", columns)
    assert "'question'" in message and "data.columns.prompt" in message


def test_an_explicit_format_that_contradicts_the_data_says_which_to_use():
    message = format_error([{"prompt": "p", "chosen": "c", "rejected": "r"}], "conversational")
    assert "data.format=standard" in message and SOURCE in message
    message = format_error(
        [{"prompt": [user("p")], "chosen": [assistant("c")], "rejected": [assistant("r")]}], "standard"
    )
    assert "data.format=conversational" in message


def test_an_unknown_format_suggests_the_closest():
    message = format_error([{"prompt": "p", "chosen": "c", "rejected": "r"}], "standrad")
    assert "did you mean 'standard'" in message
