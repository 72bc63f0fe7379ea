"""Unpaired data: the ``unpaired`` format, paired data split for an unpaired loss, mismatched completions.

An unpaired example is a PreferenceExample whose ``chosen`` is its completion, whose ``label`` says whether
that is desirable, and whose ``rejected`` (filled by ``for_loss``) is another example's completion: KTO's
mismatched pair for its KL estimate.
"""

from __future__ import annotations

import json

import datasets
import pytest

from prefopt.forward.batching import collate_pairs
from prefopt.data import PreferenceExample, for_loss, load_rows, to_examples, tokenize_examples
from prefopt.data.tokenize import SAME_AFTER_TRUNCATION
from prefopt.errors import PrefoptError
from helpers import assistant, user

SOURCE = "prefs.jsonl (split train)"
SETTINGS = dict(max_length=64, max_prompt_length=32, append_eos=True, invalid_rows="error", source=SOURCE)


def examples_of(rows: list[dict], fmt: str = "auto", columns: dict | None = None):
    return to_examples(datasets.Dataset.from_list(rows), columns or {}, fmt, SOURCE)


def jsonl_rows(path, rows: list[dict]) -> datasets.Dataset:
    """Rows read back from a jsonl file, as a run reads them (a column may mix bools and numbers there)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_rows(str(path), "train")


def for_kto(examples, fmt: str = "auto") -> list[PreferenceExample]:
    return for_loss(examples, unpaired=True, loss_name="kto", fmt=fmt, source=SOURCE)


def one_line_error(call) -> str:
    with pytest.raises(PrefoptError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- the format ----------------------------------------------------------------------------------


def test_auto_detects_unpaired_rows_and_reads_bool_and_01_labels(tmp_path):
    rows = jsonl_rows(tmp_path / "u.jsonl", [
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt": "2+2?", "completion": "5", "label": 0},
        {"prompt": "Sky?", "completion": "blue", "label": 1},
    ])
    examples, skipped, _ = to_examples(rows, {}, "auto", SOURCE)
    assert examples == [
        PreferenceExample(0, "2+2?", "4", None, True),
        PreferenceExample(1, "2+2?", "5", None, False),
        PreferenceExample(2, "Sky?", "blue", None, True),
    ]
    assert skipped == {}
    assert examples == to_examples(rows, {}, "unpaired", SOURCE)[0]


def test_auto_reads_rows_with_chosen_as_pairs_even_beside_completion_and_label():
    examples, _, _ = examples_of([{"prompt": "p", "chosen": "a", "rejected": "b", "completion": "c", "label": True}])
    assert examples == [PreferenceExample(0, "p", "a", "b")]


def test_columns_are_mapped_through_data_columns():
    columns = {"prompt": "question", "completion": "answer", "label": "thumbs_up"}
    examples, _, _ = examples_of([{"question": "2+2?", "answer": "4", "thumbs_up": True}], "auto", columns)
    assert examples == [PreferenceExample(0, "2+2?", "4", None, True)]


def test_conversational_completions_answer_the_prompt():
    """A text prompt becomes a user message and a completion that repeats the prompt messages loses them,
    as in the paired conversational format; a completion must start with an assistant message."""
    rows = [
        {"prompt": "hi", "completion": [assistant("hello")], "label": True},
        {"prompt": "hi", "completion": [user("hi"), assistant("go away")], "label": False},
        {"prompt": "hi", "completion": [user("again")], "label": True},
    ]
    examples, skipped, first = examples_of(rows)
    assert examples == [
        PreferenceExample(0, [user("hi")], [assistant("hello")], None, True),
        PreferenceExample(1, [user("hi")], [assistant("go away")], None, False),
    ]
    assert skipped == {"column 'completion' does not start with an assistant message": 1}
    assert first == {"column 'completion' does not start with an assistant message": 2}


def test_unusable_rows_are_counted_with_a_reason(tmp_path):
    rows = jsonl_rows(tmp_path / "u.jsonl", [
        {"prompt": "p", "completion": "ok", "label": True},
        {"prompt": "p", "completion": "ok", "label": 2},
        {"prompt": "p", "completion": "ok", "label": "yes"},
        {"prompt": "p", "completion": "ok", "label": None},
        {"prompt": "p", "completion": "  ", "label": False},
        {"prompt": "", "completion": "ok", "label": False},
    ])
    examples, skipped, first = to_examples(rows, {}, "auto", SOURCE)
    assert [example.row for example in examples] == [0]
    assert skipped == {
        "column 'label' is not a bool or 0/1": 2,
        "empty value in column 'label'": 1,
        "empty value in column 'completion'": 1,
        "empty value in column 'prompt'": 1,
    }
    assert first == {
        "column 'label' is not a bool or 0/1": 1,
        "empty value in column 'label'": 3,
        "empty value in column 'completion'": 4,
        "empty value in column 'prompt'": 5,
    }


def test_an_unusable_label_fails_the_run_naming_file_row_and_column(tmp_path, smollm_tokenizer):
    """With data.invalid_rows=error (the default), the first unusable row stops tokenization in one line; with
    skip, it is counted and left out."""
    path = tmp_path / "u.jsonl"
    rows = jsonl_rows(path, [
        {"prompt": "p", "completion": " ok", "label": True},
        {"prompt": "q", "completion": " no", "label": 0},
        {"prompt": "r", "completion": " hm", "label": 7},
    ])
    source = f"{path} (split train)"
    examples, skipped, first = to_examples(rows, {}, "auto", source)
    settings = {**SETTINGS, "source": source, "skipped": skipped, "first_skipped_row": first}
    message = one_line_error(lambda: tokenize_examples(for_kto(examples), smollm_tokenizer, **settings))
    assert str(path) in message and "row 2" in message and "column 'label' is not a bool or 0/1" in message
    assert "data.invalid_rows=skip" in message

    kept = tokenize_examples(for_kto(examples), smollm_tokenizer, **{**settings, "invalid_rows": "skip"})
    assert len(kept) == 2 and kept.skipped == {"column 'label' is not a bool or 0/1": 1}


def test_a_missing_column_names_it_the_source_the_columns_and_the_override():
    message = one_line_error(lambda: examples_of([{"prompt": "p", "completion": "c", "ok": True}], "unpaired"))
    assert SOURCE in message and "'label'" in message and "prompt, completion, ok" in message
    assert "data.columns.label=<name>" in message and "desirable" in message
    message = one_line_error(lambda: examples_of([{"prompt": "p", "chosen": "a", "rejected": "b"}], "unpaired"))
    assert "'completion'" in message and "data.columns.completion=<name>" in message


def test_a_paired_loss_refuses_unpaired_data_in_one_line():
    examples, _, _ = examples_of([{"prompt": "p", "completion": "c", "label": True}])
    message = one_line_error(
        lambda: for_loss(examples, unpaired=False, loss_name="dpo", fmt="auto", source=SOURCE)
    )
    assert SOURCE in message and "loss 'dpo'" in message and "data.format=auto" in message


def test_a_paired_loss_gets_pairs_unchanged():
    pairs = [PreferenceExample(0, "p", "a", "b"), PreferenceExample(1, "q", "c", "d")]
    assert for_loss(pairs, unpaired=False, loss_name="dpo", fmt="auto", source=SOURCE) == pairs


# --- pairs split, completions mismatched ---------------------------------------------------------


PAIRS = [{"prompt": "p0", "chosen": "c0", "rejected": "r0"},
         {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
         {"prompt": "p2", "chosen": "c2", "rejected": "r2"}]


def test_pairs_split_like_trl_unpair_preference_dataset():
    """Every chosen response (desirable), then every rejected one (undesirable): the order, prompts and labels
    of TRL 1.16's ``trl.data_utils.unpair_preference_dataset`` on the same rows. Each example keeps its row."""
    from trl.data_utils import unpair_preference_dataset

    pairs, _, _ = examples_of(PAIRS)
    unpaired = for_kto(pairs)
    trl = unpair_preference_dataset(datasets.Dataset.from_list(PAIRS))
    expected = list(zip(trl["prompt"], trl["completion"], trl["label"]))
    assert [(e.prompt, e.chosen, e.label) for e in unpaired] == expected
    assert [e.row for e in unpaired] == [0, 1, 2, 0, 1, 2]


def test_each_example_takes_the_previous_examples_completion():
    """Example i's rejected is example i - 1's completion, and example 0 takes the last one's. Split pairs
    never take their own pair's other response (it answers the same prompt)."""
    unpaired = for_kto(examples_of(PAIRS)[0])
    assert [(e.chosen, e.rejected) for e in unpaired] == [
        ("c0", "r2"), ("c1", "c0"), ("c2", "c1"), ("r0", "c2"), ("r1", "r0"), ("r2", "r1"),
    ]
    assert all(e.prompt != partner.prompt for e, partner in zip(unpaired, unpaired[-1:] + unpaired[:-1]))


def test_rotation_matches_trl_kto_trainer_kl_completions(tiny_model_dir, tokenizer, tmp_path):
    """TRL 1.16's KTOTrainer, given the split as one per-device batch, pairs every example with the same
    mismatched completion as prefopt: its ``KL_completion_ids`` decode to prefopt's rejected responses (TRL
    rotates within each per-device batch; prefopt over the whole split, which is the same here)."""
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2 * len(PAIRS), report_to=[],
                     use_cpu=True, bf16=False, disable_tqdm=True)
    rows = datasets.Dataset.from_list([{k: f" {v}" if k != "prompt" else v for k, v in row.items()} for row in PAIRS])
    trainer = KTOTrainer(model=str(tiny_model_dir), args=args, train_dataset=rows, processing_class=tokenizer)
    trl = trainer.train_dataset.to_dict()

    ours = tokenize_examples(for_kto(examples_of(rows.to_list())[0]), tokenizer, **SETTINGS).pairs
    assert [pair.label for pair in ours] == trl["label"]
    assert [tokenizer.decode(pair.chosen_ids) for pair in ours] == tokenizer.batch_decode(trl["completion_ids"])
    assert [tokenizer.decode(pair.rejected_ids) for pair in ours] == tokenizer.batch_decode(trl["KL_completion_ids"])


def test_a_mismatched_completion_equal_to_its_own_is_kept(smollm_tokenizer):
    """Duplicate completions (and a split of one example) give an example whose mismatched completion is its
    own; that is not the paired "identical after truncation" case, so nothing is dropped."""
    examples = [PreferenceExample(0, "Q?", " same", None, True), PreferenceExample(1, "R?", " same", None, False)]
    result = tokenize_examples(for_kto(examples), smollm_tokenizer, **SETTINGS)
    assert len(result) == 2 and SAME_AFTER_TRUNCATION not in result.skipped
    assert all(pair.chosen_ids == pair.rejected_ids for pair in result.pairs)

    [alone] = tokenize_examples(for_kto(examples[:1]), smollm_tokenizer, **SETTINGS).pairs
    assert alone.chosen_ids == alone.rejected_ids and alone.label is True


def test_unpaired_examples_need_their_mismatched_completion_before_tokenization(smollm_tokenizer):
    with pytest.raises(ValueError, match="for_loss"):
        tokenize_examples([PreferenceExample(0, "Q?", " a", None, True)], smollm_tokenizer, **SETTINGS)


def test_the_fingerprint_covers_the_labels(smollm_tokenizer):
    """Flipping one label, or reading the same token ids as a pair, gives another fingerprint (so another
    reference-cache entry), though no token id changed."""
    examples = [PreferenceExample(0, "Q?", " a", " b", True), PreferenceExample(1, "R?", " c", " d", False)]
    base = tokenize_examples(examples, smollm_tokenizer, **SETTINGS).fingerprint
    flipped = [examples[0], PreferenceExample(1, "R?", " c", " d", True)]
    as_pairs = [PreferenceExample(e.row, e.prompt, e.chosen, e.rejected) for e in examples]
    assert base != tokenize_examples(flipped, smollm_tokenizer, **SETTINGS).fingerprint
    assert base != tokenize_examples(as_pairs, smollm_tokenizer, **SETTINGS).fingerprint
    assert base == tokenize_examples(examples, smollm_tokenizer, **SETTINGS).fingerprint


def test_batches_carry_the_labels(smollm_tokenizer):
    """collate_pairs puts each example's label in ``labels`` (bool, in batch order); pairs have none."""
    unpaired = tokenize_examples(for_kto(examples_of(PAIRS)[0]), smollm_tokenizer, **SETTINGS).pairs
    batch = collate_pairs([unpaired[i] for i in (4, 0)], [4, 0], pad_id=2)
    assert batch.labels.tolist() == [False, True] and batch.to("cpu").labels.tolist() == [False, True]
    paired = tokenize_examples(examples_of(PAIRS)[0], smollm_tokenizer, **SETTINGS).pairs
    assert collate_pairs(paired[:2], [0, 1], pad_id=2).labels is None
