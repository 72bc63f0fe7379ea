"""The llm_pairwise judge (plugins/judges/llm_pairwise.py) on a random-init model with SmolLM2's tokenizer.

Expected values come from one unpadded forward per question, rendered here from the template as the
module docstring describes, so the judge's batching, padding and answer-token lookup are checked against
a path that has none of them."""

from __future__ import annotations

import pydantic
import pytest
import torch

from conftest import tiny_config
from helpers import online_tree, round_records, train_tree
from prefopt import JudgeContext
from prefopt.errors import PrefoptError
from prefopt_plugins.judges.llm_pairwise import DEFAULT_TEMPLATE, LLMPairwiseJudge

PROMPTS = ["The film opens with", "Review: the soundtrack", "A short one"]
FIRST = [" a quiet, moving scene that sets the tone", " loud", " fine."]
SECOND = [" noise", " sweeping and memorable, the best part of the whole film", " bad."]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, tokenizer):
    """A random-init model with a wide initialization, so that its answers lean clearly one way or the other
    and differ from question to question."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("judge-model")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(len(tokenizer), initializer_range=0.5)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_judge(path, **options) -> LLMPairwiseJudge:
    return LLMPairwiseJudge(LLMPairwiseJudge.Config(path=str(path), **options), JudgeContext())


@torch.no_grad()
def expected_p(path, tokenizer, text: str, labels: tuple[str, str], special: bool) -> float:
    """P(first better) from one forward over ``text`` and the tokens both answers begin with: the softmax over
    the logits of the first token where the two answered texts differ."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    one, two = (tokenizer(text + label, add_special_tokens=special)["input_ids"] for label in labels)
    split = next(i for i, (a, b) in enumerate(zip(one, two)) if a != b)
    logits = model(input_ids=torch.tensor([one[:split]])).logits[0, -1]
    return logits[[one[split], two[split]]].softmax(-1)[0].item()


def chat_text(tokenizer, prompt: str, first: str, second: str) -> str:
    question = DEFAULT_TEMPLATE.format(prompt=prompt, first=first, second=second)
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def test_one_order_is_the_softmax_of_the_two_answers_after_the_question(judge_dir, tokenizer):
    judge = make_judge(judge_dir, both_orders=False, batch_size=2)  # 3 questions: a padded batch and one alone
    got = judge.prefer(PROMPTS, FIRST, SECOND)
    want = [expected_p(judge_dir, tokenizer, chat_text(tokenizer, p, a, b), ("1", "2"), special=False)
            for p, a, b in zip(PROMPTS, FIRST, SECOND)]
    assert got == pytest.approx(want, abs=1e-5)
    assert max(abs(p - 0.5) for p in got) > 0.05  # the check above is not 0.5 against 0.5


def test_a_model_without_logits_to_keep_gives_the_same_answers(judge_dir):
    """Models with their own code may not take logits_to_keep: the judge then reads the full logits."""
    kept = make_judge(judge_dir, both_orders=False, batch_size=3)
    full = make_judge(judge_dir, both_orders=False, batch_size=3)
    full._load()
    assert full._keeps_logits
    full._keeps_logits = False
    assert full.prefer(PROMPTS, FIRST, SECOND) == pytest.approx(kept.prefer(PROMPTS, FIRST, SECOND), abs=1e-5)


def test_both_orders_average_the_swapped_question_so_swapping_gives_one_minus_p(judge_dir):
    one_way = make_judge(judge_dir, both_orders=False)
    forward, backward = one_way.prefer(PROMPTS, FIRST, SECOND), one_way.prefer(PROMPTS, SECOND, FIRST)
    both = make_judge(judge_dir)
    got = both.prefer(PROMPTS, FIRST, SECOND)
    assert got == pytest.approx([(f + 1 - b) / 2 for f, b in zip(forward, backward)], abs=1e-6)
    assert both.prefer(PROMPTS, SECOND, FIRST) == pytest.approx([1 - p for p in got], abs=1e-6)
    # the random judge's position bias: one order alone does not give 1 - p
    assert max(abs(f + b - 1) for f, b in zip(forward, backward)) > 0.01


def test_plain_format_appends_answer_and_reads_the_spaced_labels(judge_dir, tokenizer):
    judge = make_judge(judge_dir, format="plain", both_orders=False)
    got = judge.prefer(PROMPTS[:1], FIRST[:1], SECOND[:1])
    text = DEFAULT_TEMPLATE.format(prompt=PROMPTS[0], first=FIRST[0], second=SECOND[0]) + "\nAnswer:"
    assert got == pytest.approx([expected_p(judge_dir, tokenizer, text, (" 1", " 2"), special=True)], abs=1e-5)


def test_chat_message_prompts_are_written_as_role_lines(judge_dir):
    judge = make_judge(judge_dir, both_orders=False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rate the film."}]
    assert judge.prefer([messages], ["good"], ["bad"]) == pytest.approx(
        judge.prefer(["system: Be brief.\nuser: Rate the film."], ["good"], ["bad"]), abs=1e-6)


def test_completions_are_cut_to_max_completion_tokens(judge_dir, tokenizer):
    judge = make_judge(judge_dir, both_orders=False, max_completion_tokens=3)
    stem = " one two three"
    assert len(tokenizer(stem, add_special_tokens=False)["input_ids"]) == 3
    cut, whole = judge.prefer(["Q"] * 2, [stem + " four five", stem], ["other"] * 2)
    assert cut == pytest.approx(whole, abs=1e-6)
    uncut = make_judge(judge_dir, both_orders=False).prefer(["Q"], [stem + " four five"], ["other"])
    assert uncut[0] != pytest.approx(whole, abs=1e-4)


def test_pick_chooses_the_completion_that_wins_most_comparisons(judge_dir):
    judge = make_judge(judge_dir)
    group = [FIRST[0], SECOND[0], FIRST[1]]
    (choice,) = judge.pick([PROMPTS[0]], [group])
    pairs = [(0, 1), (0, 2), (1, 2)]
    p = judge.prefer([PROMPTS[0]] * 3, [group[a] for a, _ in pairs], [group[b] for _, b in pairs])
    wins = [0.0, 0.0, 0.0]
    for (a, b), value in zip(pairs, p):
        wins[a if value > 0.5 else b] += 1.0
    assert choice is not None and list(choice.scores) == wins and sum(wins) == 3.0
    assert wins[choice.chosen] == max(wins) and wins[choice.rejected] == min(wins)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"template": "Which is better, {first} or {second}?"}, r"needs each of \{prompt\}, \{first\} and \{second\}"),
        ({"template": "{prompt} {first} {second} {first}"}, r"exactly once"),
        ({"template": "{prompt} {first} {second} {"}, r"brace"),
        ({"labels": ["A", "A"]}, r"two different"),
    ],
)
def test_config_problems_are_refused_when_the_recipe_is_read(options, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        LLMPairwiseJudge.Config(path="unused", **options)


def test_labels_where_one_begins_the_other_are_refused_naming_the_key(judge_dir):
    judge = make_judge(judge_dir, labels=["1", "12"])  # SmolLM2 writes digits one token each
    with pytest.raises(PrefoptError, match=r"algorithm\.judge\.labels .*one answer's tokens begin the other's"):
        judge.prefer(PROMPTS[:1], FIRST[:1], SECOND[:1])


def test_a_missing_model_names_the_judge_key(tmp_path):
    judge = make_judge(tmp_path / "nowhere")
    with pytest.raises(PrefoptError, match=r"^algorithm\.judge\.path .*nowhere"):
        judge.prefer(PROMPTS[:1], FIRST[:1], SECOND[:1])


def test_an_online_round_is_judged_by_the_llm(tiny_model_dir, judge_dir, pairs_file, tmp_path):
    """The judge by name in a recipe: each prompt's scores are win counts over its 3 completions."""
    out = tmp_path / "run"
    algorithm = {"name": "online_dpo", "rounds": 1, "samples_per_prompt": 3,
                 "judge": {"name": "llm_pairwise", "path": str(judge_dir)}}
    train_tree(online_tree(tiny_model_dir, pairs_file, out, algorithm))
    (records,) = round_records(out)
    assert len(records) == 4
    for r in records:
        assert sum(r["scores"]) == 3.0  # 3 comparisons, one win each (halves for exact ties)
        if r["chosen"] is not None:
            assert r["scores"][r["chosen"]] > r["scores"][r["rejected"]]
    assert any(r["chosen"] is not None for r in records)
