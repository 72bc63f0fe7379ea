"""Judges: the pair-picking rules of ScoreJudge and PairwiseJudge (hand-checked), the function judge, the
sentiment task's reward as a judge function, and the reward-model judge on a tiny random-init classifier.

The reward functions the function judge imports are defined in this module (importable as
``test_judges``, since pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from conftest import tiny_config
from prefopt import Choice, JudgeConfig, JudgeContext, PairwiseJudge, ScoreJudge
from prefopt.errors import PrefoptError
from prefopt.registry.loading import AUTOLOAD_OFF_ENV, EXTRA_PLUGINS_ENV, default_plugins
from prefopt_plugins.judges.function import FunctionJudge
from prefopt_plugins.judges.reward_model import RewardModelJudge

# ----------------------------------------------------------------------------------------------------------
# Reward functions the function judge names as "test_judges:<name>"

CALLS: list[tuple[list, list]] = []
NOT_CALLABLE = 3


def length_reward(prompts, completions):
    CALLS.append((prompts, completions))
    return [float(len(c)) for c in completions]


def one_short(prompts, completions):
    return [1.0] * (len(completions) - 1)


def nan_at_one(prompts, completions):
    return [0.0, math.nan] + [0.0] * (len(completions) - 2)


def words(prompts, completions):
    return ["high" for _ in completions]


# ----------------------------------------------------------------------------------------------------------
# ScoreJudge.pick and PairwiseJudge.pick: best and worst, ties, min_margin


class NumberJudge(ScoreJudge):
    """Each completion is a number written out; that number is its score."""

    name = "number"

    def __init__(self, min_margin: float = 0.0) -> None:
        super().__init__(JudgeConfig(min_margin=min_margin), JudgeContext())
        self.calls = []

    def scores(self, prompts, completions):
        self.calls.append((list(prompts), list(completions)))
        return [float(c) for c in completions]


class StrengthJudge(PairwiseJudge):
    """Each completion is a positive strength s; first beats second with probability s1 / (s1 + s2)."""

    name = "strength"

    def __init__(self, min_margin: float = 0.0) -> None:
        super().__init__(JudgeConfig(min_margin=min_margin), JudgeContext())
        self.calls = []

    def prefer(self, prompts, first, second):
        self.calls.append((list(prompts), list(first), list(second)))
        return [float(a) / (float(a) + float(b)) for a, b in zip(first, second)]


def test_score_judge_picks_the_best_and_the_worst():
    judge = NumberJudge()
    choices = judge.pick(["p", "q"], [["1", "3", "2"], ["0", "-1", "5", "4"]])
    assert choices == [Choice(1, 0, (1.0, 3.0, 2.0)), Choice(2, 1, (0.0, -1.0, 5.0, 4.0))]
    assert choices[0].margin == 2.0 and choices[1].margin == 6.0
    # One scoring call, with the prompt repeated once per completion (parallel lists).
    assert judge.calls == [(["p"] * 3 + ["q"] * 4, ["1", "3", "2", "0", "-1", "5", "4"])]


def test_score_judge_ties_give_no_pair_and_the_first_index_wins_ties():
    judge = NumberJudge()
    assert judge.pick(["a", "b", "c"], [["2", "2"], ["7", "7", "7"], ["4"]]) == [None, None, None]
    # Best 3 at indices 0 and 2, worst 1 at indices 1 and 3: the first of each.
    assert judge.pick(["a"], [["3", "1", "3", "1"]]) == [Choice(0, 1, (3.0, 1.0, 3.0, 1.0))]


def test_score_judge_min_margin_is_strict():
    assert NumberJudge(min_margin=0.5).pick(["a"], [["1", "1.5"]]) == [None]  # margin 0.5 is not more than 0.5
    assert NumberJudge(min_margin=0.4).pick(["a"], [["1", "1.5"]]) == [Choice(1, 0, (1.0, 1.5))]


def test_pairwise_judge_counts_wins_over_every_pair():
    judge = StrengthJudge()
    # Strengths 1, 3, 2: 1 beats 0, 2 beats 0, 1 beats 2 -> wins 0, 2, 1.
    # Strengths 2, 2, 1, 3: (0,1) even -> half each; 0 beats 2; 3 beats 0, 1, 2; 1 beats 2 -> 1.5, 1.5, 0, 3.
    choices = judge.pick(["p", "q"], [["1", "3", "2"], ["2", "2", "1", "3"]])
    assert choices == [Choice(1, 0, (0.0, 2.0, 1.0)), Choice(3, 2, (1.5, 1.5, 0.0, 3.0))]
    # Every unordered pair of each prompt once, in one call: 3 + 6 comparisons.
    ((prompts, first, second),) = judge.calls
    assert prompts == ["p"] * 3 + ["q"] * 6
    assert list(zip(first, second))[:3] == [("1", "3"), ("1", "2"), ("3", "2")]


def test_pairwise_judge_even_calls_split_the_win_and_tie():
    judge = StrengthJudge()
    assert judge.pick(["a", "b"], [["2", "2"], ["5", "5", "5"]]) == [None, None]
    # Wins 0, 2, 1: margin 2 is not more than min_margin 2.
    assert StrengthJudge(min_margin=2).pick(["a"], [["1", "3", "2"]]) == [None]
    assert StrengthJudge(min_margin=1.5).pick(["a"], [["1", "3", "2"]]) == [Choice(1, 0, (0.0, 2.0, 1.0))]


# ----------------------------------------------------------------------------------------------------------
# The function judge


def function_judge(spec: str, **options) -> FunctionJudge:
    return FunctionJudge(FunctionJudge.Config(function=spec, **options), JudgeContext())


def test_function_judge_scores_with_the_named_function():
    CALLS.clear()
    judge = function_judge("test_judges:length_reward")
    chat = [{"role": "user", "content": "Say something."}]
    choices = judge.pick(["Hi", chat], [["a", "abc", "ab"], ["xy", "x"]])
    assert choices == [Choice(1, 0, (1.0, 3.0, 2.0)), Choice(0, 1, (2.0, 1.0))]
    assert CALLS == [(["Hi"] * 3 + [chat] * 2, ["a", "abc", "ab", "xy", "x"])]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("prefopt_no_such_module_xyz:fn", r"'prefopt_no_such_module_xyz:fn'.*cannot import module "
                                          r"'prefopt_no_such_module_xyz'.*PYTHONPATH"),
        ("test_judges:length_rewrd", r"'test_judges' has no attribute 'length_rewrd' \(did you mean 'length_reward'"),
        ("test_judges:NOT_CALLABLE", r"'test_judges.NOT_CALLABLE' is a int, not a callable"),
    ],
    ids=["no-module", "no-attribute", "not-callable"],
)
def test_function_judge_fails_at_construction_naming_the_function(spec, message):
    with pytest.raises(PrefoptError, match=f"^algorithm.judge.function .*{message}") as err:
        function_judge(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("test_judges:one_short", r"'test_judges:one_short' returned 2 scores for 3 completions"),
        ("test_judges:nan_at_one", r"'test_judges:nan_at_one' returned a non-finite score \(nan\) at index 1"),
        ("test_judges:words", r"'test_judges:words' returned 'high' at index 0, not a number"),
    ],
    ids=["count", "non-finite", "not-a-number"],
)
def test_function_judge_checks_what_the_function_returns(spec, message):
    judge = function_judge(spec)
    with pytest.raises(PrefoptError, match=f"^algorithm.judge.function {message}") as err:
        judge.pick(["p"], [["a", "b", "c"]])
    assert "\n" not in str(err.value)


def test_function_option_must_name_module_and_callable():
    with pytest.raises(pydantic.ValidationError, match="package.module:callable"):
        FunctionJudge.Config(function="test_judges.length_reward")
    with pytest.raises(pydantic.ValidationError, match="function"):
        FunctionJudge.Config()


def test_sentiment_completion_reward_is_vader_of_the_completion_alone():
    from prefopt_plugins.tasks.sentiment import completion_reward, vader_reward

    completions = [" a joy from start to finish.", " a dull and tedious mess.", " fine.", ""]
    prompts = ["The movie was", "Terrible, awful,", [{"role": "user", "content": "Wonderful!"}], "x"]
    assert completion_reward(prompts, completions) == vader_reward(completions)
    judge = function_judge("prefopt_plugins.tasks.sentiment:completion_reward")
    (choice,) = judge.pick(["The movie was"], [completions[:3]])
    assert (choice.chosen, choice.rejected) == (0, 1)
    assert list(choice.scores) == vader_reward(completions[:3])


# ----------------------------------------------------------------------------------------------------------
# The reward-model judge on a tiny random-init LlamaForSequenceClassification


def save_reward_model(path, tokenizer, num_labels: int):
    """A tiny classifier with SmolLM2's tokenizer and no pad id in its config (the judge must set it),
    its head scaled up so that scores are far apart."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config(len(tokenizer), num_labels=num_labels, pad_token_id=None))
    with torch.no_grad():
        model.score.weight.normal_(0, 1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tokenizer):
    return save_reward_model(tmp_path_factory.mktemp("rm"), tokenizer, num_labels=1)


@pytest.fixture(scope="module")
def rm2_dir(tmp_path_factory, tokenizer):
    return save_reward_model(tmp_path_factory.mktemp("rm2"), tokenizer, num_labels=2)


def rm_judge(path, **options) -> RewardModelJudge:
    return RewardModelJudge(RewardModelJudge.Config(path=str(path), **options), JudgeContext(device="cpu"))


def direct_logits(path, ids: list[int]) -> torch.Tensor:
    """The model's logits for one unpadded sequence: its last token's, as the model pools them."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert model.config.pad_token_id is None
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


PROMPTS = ["The movie was", "I left the theater feeling", "Overall, the story of this long and winding film", "Its"]
COMPLETIONS = [" a joy.", " bored and annoyed by everything I saw.", " is charming.", " humor is sharp and delightful."]


def test_reward_model_scores_equal_single_sequence_forwards_in_mixed_length_batches(rm_dir, tokenizer):
    chat = [{"role": "user", "content": "Tell me about the film."}]
    prompts, completions = [*PROMPTS, chat], [*COMPLETIONS, " It is lovely."]
    for fmt in ("plain", "chat", "auto"):
        judge = rm_judge(rm_dir, format=fmt, batch_size=3)
        if fmt == "plain":
            prompts_here, completions_here = prompts[:-1], completions[:-1]
        else:
            prompts_here, completions_here = prompts, completions
        scores = judge.scores(prompts_here, completions_here)
        expected, lengths = [], set()
        for prompt, completion in zip(prompts_here, completions_here):
            if fmt == "plain":
                ids = tokenizer(prompt + completion)["input_ids"]
            else:  # auto is chat: SmolLM2's tokenizer has a chat template
                messages = chat if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
                text = tokenizer.apply_chat_template(
                    [*messages, {"role": "assistant", "content": completion}], tokenize=False
                )
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            expected.append(direct_logits(rm_dir, ids)[0].item())
            lengths.add(len(ids))
        assert len(lengths) > 1, "the batch must mix lengths for padding to matter"
        assert scores == pytest.approx(expected, abs=1e-5), fmt
        assert max(expected) - min(expected) > 0.1  # far apart: a wrong token or padding would show
        judge.close()


def test_reward_model_cuts_long_sequences_to_max_length(rm_dir, tokenizer):
    judge = rm_judge(rm_dir, format="plain", max_length=4)
    ids = tokenizer(PROMPTS[2] + COMPLETIONS[2])["input_ids"]
    assert len(ids) > 4
    (score,) = judge.scores([PROMPTS[2]], [COMPLETIONS[2]])
    assert score == pytest.approx(direct_logits(rm_dir, ids[:4])[0].item(), abs=1e-5)


def test_reward_model_pick_and_close(rm_dir):
    judge = rm_judge(rm_dir, format="plain")
    (choice,) = judge.pick([PROMPTS[0]], [COMPLETIONS])
    scores = judge.scores([PROMPTS[0]] * 4, COMPLETIONS)
    assert choice.scores == pytest.approx(tuple(scores), abs=1e-5)
    assert choice.chosen == max(range(4), key=scores.__getitem__)
    judge.close()
    assert judge.scores([PROMPTS[0]] * 4, COMPLETIONS) == pytest.approx(scores, abs=1e-5)  # reloads


def test_reward_model_label_selects_one_of_several_outputs(rm2_dir, tokenizer):
    ids = tokenizer(PROMPTS[1] + COMPLETIONS[1])["input_ids"]
    logits = direct_logits(rm2_dir, ids)
    for label, index in ((0, 0), (1, 1), ("LABEL_1", 1)):
        (score,) = rm_judge(rm2_dir, format="plain", label=label).scores([PROMPTS[1]], [COMPLETIONS[1]])
        assert score == pytest.approx(logits[index].item(), abs=1e-5)


@pytest.mark.parametrize(
    "label, message",
    [
        (None, r"has 2 outputs \(0=LABEL_0, 1=LABEL_1\); set algorithm.judge.label"),
        (2, r"algorithm.judge.label is 2 but .* has 2 output\(s\); give an index from 0 to 1"),
        ("LABEL_7", r"algorithm.judge.label 'LABEL_7' is not a label of .*did you mean"),
    ],
    ids=["none", "out-of-range", "unknown-name"],
)
def test_reward_model_with_several_outputs_needs_a_valid_label(rm2_dir, label, message):
    judge = rm_judge(rm2_dir, label=label)  # nothing is loaded yet
    with pytest.raises(PrefoptError, match=message) as err:
        judge.scores(["p"], ["c"])
    assert "\n" not in str(err.value)


def test_reward_model_refuses_a_checkpoint_without_a_reward_head(tiny_model_dir, tmp_path):
    with pytest.raises(PrefoptError, match=r"is not a reward model: its checkpoint lacks score.weight"):
        rm_judge(tiny_model_dir).scores(["p"], ["c"])
    with pytest.raises(PrefoptError, match=r"^algorithm.judge.path '.*nowhere': no such directory"):
        rm_judge(tmp_path / "nowhere").scores(["p"], ["c"])


def test_reward_model_format_errors(rm_dir):
    chat = [{"role": "user", "content": "Hello"}]
    with pytest.raises(PrefoptError, match="format is plain but a prompt is a list of chat messages"):
        rm_judge(rm_dir, format="plain").scores([chat], ["Hi"])
    with pytest.raises(pydantic.ValidationError):
        RewardModelJudge.Config(path=str(rm_dir), format="markdown")
    with pytest.raises(pydantic.ValidationError):
        RewardModelJudge.Config(path=str(rm_dir), label=-1)


# ----------------------------------------------------------------------------------------------------------
# Registration


@pytest.fixture()
def fresh_plugins(monkeypatch):
    monkeypatch.delenv(AUTOLOAD_OFF_ENV, raising=False)
    monkeypatch.delenv(EXTRA_PLUGINS_ENV, raising=False)
    default_plugins.cache_clear()
    yield default_plugins()
    default_plugins.cache_clear()


def test_judges_are_registered_and_listed(fresh_plugins, capsys):
    from prefopt.cli import main

    assert {"function", "reward_model"} <= set(fresh_plugins.judges.names())
    assert fresh_plugins.judges.get("function") is FunctionJudge
    assert fresh_plugins.judges.get("reward_model") is RewardModelJudge
    assert main(["list", "judges"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    for name, cls in (("function", FunctionJudge), ("reward_model", RewardModelJudge)):
        assert cls.summary()[:40] in rows[name]  # cut to fit 100 columns; `prefopt show` gives it whole
