"""tokenize_examples with the real SmolLM2 tokenizer: templates, special tokens, truncation, fingerprint.

SmolLM2's BOS is <|im_start|> (id 1) and its EOS <|im_end|> (id 2); it adds no BOS itself, so the
``bos_tokenizer`` fixture (the same tokenizer, prepending BOS) covers tokenizers that do.
"""

from __future__ import annotations

import copy

import pytest

from prefopt.data import PreferenceExample, tokenize_examples
from prefopt.errors import PrefoptError
from helpers import assistant, user

BOS, EOS = 1, 2
SOURCE = "prefs.jsonl (split train)"
SETTINGS = dict(max_length=64, max_prompt_length=32, append_eos=True, invalid_rows="error", source=SOURCE)


def tokenize(examples, tokenizer, **overrides):
    return tokenize_examples(examples, tokenizer, **{**SETTINGS, **overrides})


def tokenize_error(examples, tokenizer, **overrides) -> str:
    with pytest.raises(PrefoptError) as caught:
        tokenize(examples, tokenizer, **overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def ids(tokenizer, text: str, special: bool = False) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=special).input_ids)


# --- plain text ------------------------------------------------------------------------------------


def test_plain_text_prompt_and_responses_with_eos(smollm_tokenizer):
    tok = smollm_tokenizer
    [pair] = tokenize([PreferenceExample(7, "What is 2+2?", " Four.", " Five.")], tok).pairs
    assert pair.row == 7
    assert pair.prompt_ids == ids(tok, "What is 2+2?", special=True)
    assert pair.chosen_ids == ids(tok, " Four.") + (EOS,)
    assert pair.rejected_ids == ids(tok, " Five.") + (EOS,)


def test_no_eos_when_not_asked_or_already_there(smollm_tokenizer):
    tok = smollm_tokenizer
    example = PreferenceExample(0, "Q?", " yes<|im_end|>", " no")
    [pair] = tokenize([example], tok, append_eos=False).pairs
    assert pair.rejected_ids == ids(tok, " no")
    [pair] = tokenize([example], tok).pairs
    assert pair.chosen_ids == ids(tok, " yes") + (EOS,)  # the text's own EOS, not a second one
    assert pair.rejected_ids[-1] == EOS and pair.rejected_ids[-2] != EOS


def test_a_bos_adding_tokenizer_gets_one_bos(bos_tokenizer):
    tok = bos_tokenizer
    [plain, already_there] = tokenize(
        [PreferenceExample(0, "Q?", " a", " b"), PreferenceExample(1, "<|im_start|>Q?", " a", " b")], tok
    ).pairs
    assert plain.prompt_ids == (BOS,) + ids(tok, "Q?")
    assert already_there.prompt_ids == (BOS,) + ids(tok, "Q?")  # text BOS + added BOS -> one
    assert plain.chosen_ids[0] != BOS  # responses get no special tokens


# --- conversations ---------------------------------------------------------------------------------


def test_messages_go_through_the_chat_template_once(smollm_tokenizer):
    tok = smollm_tokenizer
    prompt, chosen = [user("hi")], [assistant("hello there")]
    [pair] = tokenize(
        [PreferenceExample(0, prompt, chosen, [assistant("go away")])], tok, max_prompt_length=None
    ).pairs
    prompt_text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tok.apply_chat_template(prompt + chosen, tokenize=False)
    assert tok.decode(pair.prompt_ids) == prompt_text
    assert tok.decode(pair.prompt_ids + pair.chosen_ids) == full_text
    assert pair.prompt_ids[:2] == (BOS, ids(tok, "system")[0])  # the template's BOS, once
    # the template closes the turn with "<|im_end|>\n": no EOS is added after it
    assert pair.chosen_ids[-2:] == (EOS, ids(tok, "\n")[0])


def test_a_bos_adding_tokenizer_adds_no_bos_to_templated_text(bos_tokenizer):
    example = PreferenceExample(0, [user("hi")], [assistant("a")], [assistant("b")])
    [pair] = tokenize([example], bos_tokenizer, max_prompt_length=None).pairs
    assert pair.prompt_ids[0] == BOS and pair.prompt_ids[1] != BOS


def test_conversations_need_a_chat_template(smollm_tokenizer):
    tok = copy.copy(smollm_tokenizer)
    tok.chat_template = None
    message = tokenize_error([PreferenceExample(0, [user("hi")], [assistant("a")], [assistant("b")])], tok)
    assert SOURCE in message and "chat template" in message


def test_a_template_that_renders_the_prompt_differently_is_an_error(smollm_tokenizer):
    tok = copy.copy(smollm_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    message = tokenize_error([PreferenceExample(3, [user("hi")], [assistant("a")], [assistant("b")])], tok)
    assert SOURCE in message and "row 3" in message and "chat template" in message


def test_messages_the_template_rejects_make_the_row_unusable(smollm_tokenizer):
    tok = copy.copy(smollm_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>{% endif %}"
    )
    examples = [
        PreferenceExample(0, [user("hi")], [assistant("a")], [assistant("b")]),
        PreferenceExample(1, [{"role": "tool", "content": "x"}], [assistant("a")], [assistant("b")]),
    ]
    result = tokenize(examples, tok, invalid_rows="skip")
    assert [pair.row for pair in result.pairs] == [0]
    assert result.skipped == {"the chat template rejects the messages: no tools here": 1}


# --- truncation --------------------------------------------------------------------------------------


def test_truncation_keeps_the_prompt_end_and_the_response_start(smollm_tokenizer):
    tok = smollm_tokenizer
    prompt, chosen = " ".join(f"w{i}" for i in range(40)), " " + " ".join(f"c{i}" for i in range(40))
    [pair] = tokenize(
        [PreferenceExample(0, prompt, chosen, " short")], tok, max_length=30, max_prompt_length=10
    ).pairs
    assert pair.prompt_ids == ids(tok, prompt, special=True)[-10:]
    assert pair.chosen_ids == ids(tok, chosen)[:20]  # cut, so no EOS: the response did not end there
    assert pair.rejected_ids == ids(tok, " short") + (EOS,)


def test_a_prompt_that_fills_max_length_is_unusable(smollm_tokenizer):
    long_prompt = " ".join(["word"] * 30)
    examples = [PreferenceExample(0, "Q?", " a", " b"), PreferenceExample(5, long_prompt, " a", " b")]
    result = tokenize(examples, smollm_tokenizer, max_length=20, max_prompt_length=None, invalid_rows="skip")
    assert [pair.row for pair in result.pairs] == [0]
    [reason] = result.skipped
    assert "prompt longer than max_length" in reason and result.first_skipped_row == {reason: 5}

    message = tokenize_error(examples, smollm_tokenizer, max_length=20, max_prompt_length=None)
    assert SOURCE in message and "row 5" in message and "prompt longer than max_length" in message
    assert "data.max_length" in message and "data.max_prompt_length" in message
    assert "data.invalid_rows=skip" in message


def test_responses_identical_after_truncation_are_unusable(smollm_tokenizer):
    example = PreferenceExample(0, "Q?", " same start then A", " same start then B")
    result = tokenize(
        [example, PreferenceExample(1, "Q?", " a", " b")],
        smollm_tokenizer,
        max_length=4,
        max_prompt_length=None,
        invalid_rows="skip",
    )
    assert result.skipped == {"chosen and rejected identical after truncation to max_length": 1}


def test_a_prompt_without_tokens_is_unusable(smollm_tokenizer):
    result = tokenize(
        [PreferenceExample(0, "", " a", " b"), PreferenceExample(1, "Q?", " a", " b")],
        smollm_tokenizer,
        invalid_rows="skip",
    )
    assert result.skipped == {"prompt has no tokens": 1} and len(result) == 1


# --- unusable rows ---------------------------------------------------------------------------------


def test_rows_skipped_earlier_fail_in_error_mode_with_the_first_row(smollm_tokenizer):
    earlier = {"empty value in column 'chosen'": 3}
    first = {"empty value in column 'chosen'": 4}
    examples = [PreferenceExample(0, "Q?", " a", " b"), PreferenceExample(9, "x " * 100, " a", " b")]
    message = tokenize_error(
        examples, smollm_tokenizer, max_prompt_length=None, skipped=earlier, first_skipped_row=first
    )
    assert "row 4" in message and "empty value in column 'chosen'" in message
    assert "4 unusable rows in all" in message and "data.invalid_rows=skip" in message

    result = tokenize(
        examples,
        smollm_tokenizer,
        max_prompt_length=None,
        invalid_rows="skip",
        skipped=earlier,
        first_skipped_row=first,
    )
    assert len(result) == 1 and sum(result.skipped.values()) == 4
    assert result.first_skipped_row["empty value in column 'chosen'"] == 4
    assert earlier == {"empty value in column 'chosen'": 3}  # the caller's dict is left alone


def test_no_usable_row_at_all_is_an_error_even_when_skipping(smollm_tokenizer):
    message = tokenize_error(
        [PreferenceExample(0, "x " * 100, " a", " b")],
        smollm_tokenizer,
        max_prompt_length=None,
        invalid_rows="skip",
    )
    assert SOURCE in message and "no usable rows" in message and "data.max_length" in message


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (dict(invalid_rows="ignore"), "data.invalid_rows"),
        (dict(max_length=64, max_prompt_length=64), "data.max_prompt_length"),
        (dict(max_length=1, max_prompt_length=None), "data.max_length"),
    ],
)
def test_settings_out_of_range_are_named(smollm_tokenizer, overrides, expected):
    assert expected in tokenize_error([PreferenceExample(0, "Q?", " a", " b")], smollm_tokenizer, **overrides)


# --- fingerprint -------------------------------------------------------------------------------------


def test_the_fingerprint_follows_settings_tokens_and_tokenizer(smollm_tokenizer, bos_tokenizer):
    examples = [PreferenceExample(0, "Q?", " a", " b")]
    base = tokenize(examples, smollm_tokenizer).fingerprint
    assert len(base) == 64 and base == tokenize(examples, copy.deepcopy(smollm_tokenizer)).fingerprint
    assert base != tokenize(examples, smollm_tokenizer, max_length=65).fingerprint  # same ids, other setting
    assert base != tokenize(examples, smollm_tokenizer, append_eos=False).fingerprint
    assert base != tokenize([PreferenceExample(0, "Q?", " a", " c")], smollm_tokenizer).fingerprint
    assert base != tokenize(examples, bos_tokenizer).fingerprint
    # the row number is not content: the same tokens from another row share a cache entry
    assert base == tokenize([PreferenceExample(5, "Q?", " a", " b")], smollm_tokenizer).fingerprint
