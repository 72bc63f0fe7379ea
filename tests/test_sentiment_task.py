"""The sentiment task: the corpus, the VADER reward, deterministic cached builds, and evaluation.

Builds use conftest's tiny random-init Llama with the real SmolLM2 tokenizer, so the pipeline
(tokenize, sample, decode, score, pair) is the real one while generation takes well under a second.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from prefopt import TaskContext
from prefopt.errors import PrefoptError
from prefopt.paths import CACHE_ENV, cache_dir, cache_root
from prefopt.registry.loading import load_plugins
from prefopt_plugins.tasks.sentiment import (
    SDIST_NAME,
    SentimentConfig,
    SentimentTask,
    load_snippets,
    vader_reward,
)

# Small enough for a second per build, large enough that some prompts do not tie.
TINY_TASK = dict(num_train_prompts=12, num_eval_prompts=6, max_new_tokens=12, batch_size=16)


# Read before any fixture points PREFOPT_CACHE at a temporary directory.
USER_SDIST = cache_root() / "assets" / SDIST_NAME


def seed_cache_with_user_sdist() -> None:
    """Copy the user's VADER sdist into the current (private) cache when there is one; otherwise the
    first build downloads it from PyPI, once per session since the test cache is session-wide."""
    cached = cache_dir("assets") / SDIST_NAME
    if USER_SDIST.is_file() and not cached.is_file():
        shutil.copy(USER_SDIST, cached)


@pytest.fixture(autouse=True)
def reuse_user_sdist():
    seed_cache_with_user_sdist()


def load_tiny(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def make_ctx(model_dir, tokenizer, task_cache, seed=0, load_model=None) -> TaskContext:
    return TaskContext(
        model_id=str(model_dir),
        tokenizer=tokenizer,
        load_model=load_model or (lambda: load_tiny(model_dir)),
        cache_dir=Path(task_cache),
        seed=seed,
        show_progress=False,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, tokenizer):
    """One build with the tiny settings (seed 0), shared by the tests that only read it.

    Module-scoped fixtures are set up before conftest's per-test cache redirect, so this one points
    PREFOPT_CACHE at a private directory itself."""
    task = SentimentTask(SentimentConfig(**TINY_TASK))
    ctx = make_ctx(tiny_model_dir, tokenizer, tmp_path_factory.mktemp("built"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("built-prefopt-cache")))
        seed_cache_with_user_sdist()
        return task, task.build(ctx)


def test_snippets_are_the_rated_movie_reviews():
    snippets = load_snippets()
    assert len(snippets) == 10_605
    assert sorted(s.id for s in snippets) == list(range(1, 10_606))
    assert all(isinstance(s.rating, float) and -4 <= s.rating <= 4 for s in snippets)
    assert snippets[0].text.startswith("The Rock is destined to be the 21st Century's new")
    assert not any("\r" in s.text or "\n" in s.text for s in snippets)


def test_vader_reward_orders_sentiment():
    positive, negative, empty = vader_reward(["I love this wonderful film.", "A dull, awful mess.", ""])
    assert positive > 0 > negative
    assert empty == 0.0


def test_config_rejects_inverted_word_range_and_unknown_keys():
    with pytest.raises(ValidationError, match="prompt_words_min"):
        SentimentConfig(prompt_words_min=9, prompt_words_max=5)
    with pytest.raises(ValidationError, match="extra"):
        SentimentConfig(num_prompts=3)


def test_plugin_registers_the_task():
    plugins = load_plugins(autoload=False, extra=["prefopt_plugins.tasks.sentiment"])
    assert plugins.tasks.get("sentiment") is SentimentTask


def test_rows_pair_the_best_and_worst_completion(built):
    _, data = built
    rows = read_jsonl(data.train)
    # Random tokens still hit VADER's lexicon often enough that most of the 12 prompts do not tie.
    assert len(rows) >= 3
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "snippet_id"}
        assert row["chosen_reward"] > row["rejected_reward"]
        assert vader_reward([row["chosen"], row["rejected"]]) == [row["chosen_reward"], row["rejected_reward"]]
    manifest = json.loads((data.train.parent / "task.json").read_text())
    assert manifest["splits"]["train"]["pairs"] + manifest["splits"]["train"]["skipped_ties"] == 12


def test_prompts_are_openings_of_disjoint_snippets(built):
    _, data = built
    texts = {s.id: s.text.split() for s in load_snippets()}
    eval_prompts = read_jsonl(data.eval.parent / "eval_prompts.jsonl")
    assert len(eval_prompts) == TINY_TASK["num_eval_prompts"]
    train_ids = {r["snippet_id"] for r in read_jsonl(data.train)}
    eval_ids = {p["snippet_id"] for p in eval_prompts} | {r["snippet_id"] for r in read_jsonl(data.eval)}
    assert not train_ids & eval_ids
    for row in read_jsonl(data.train) + eval_prompts:
        words = (row.get("prompt") or row["text"]).split()
        assert 1 <= len(words) <= 8 and len(words) < len(texts[row["snippet_id"]])
        assert texts[row["snippet_id"]][: len(words)] == words


def test_same_seed_same_files_other_seed_other_files(built, tmp_path, tiny_model_dir, tokenizer):
    task, first = built
    again = task.build(make_ctx(tiny_model_dir, tokenizer, tmp_path / "again", seed=0))
    other = task.build(make_ctx(tiny_model_dir, tokenizer, tmp_path / "other", seed=1))
    assert again.train.read_bytes() == first.train.read_bytes()
    assert again.eval.read_bytes() == first.eval.read_bytes()
    assert other.train.read_bytes() != first.train.read_bytes()


def test_cache_hit_does_not_load_the_model(built, tiny_model_dir, tokenizer):
    task, first = built

    def must_not_load():
        raise AssertionError("load_model called on a cache hit")

    task_cache = first.train.parent.parent
    ctx = make_ctx(tiny_model_dir, tokenizer, task_cache, load_model=must_not_load)
    assert task.build(ctx) == first


def test_other_settings_are_a_cache_miss(built, tiny_model_dir, tokenizer):
    _, first = built

    class Loaded(Exception):
        """Raised instead of loading: reaching load_model proves the build missed the cache."""

    def loaded():
        raise Loaded

    longer = SentimentTask(SentimentConfig(**{**TINY_TASK, "max_new_tokens": 13}))
    with pytest.raises(Loaded):
        longer.build(make_ctx(tiny_model_dir, tokenizer, first.train.parent.parent, load_model=loaded))


def test_too_many_prompts_is_a_user_error_before_loading_the_model(tmp_path, tiny_model_dir, tokenizer):
    task = SentimentTask(SentimentConfig(num_train_prompts=8000, num_eval_prompts=2000, prompt_words_min=20,
                                         prompt_words_max=20))  # fmt: skip
    ctx = make_ctx(tiny_model_dir, tokenizer, tmp_path, load_model=lambda: pytest.fail("loaded the model"))
    with pytest.raises(PrefoptError, match="ask for fewer prompts"):
        task.build(ctx)
    assert list(tmp_path.iterdir()) == [], "a failed build left files behind"


def test_evaluate_returns_finite_metrics_and_keeps_random_state(built, tiny_model_dir, tokenizer):
    task, data = built
    model = load_tiny(tiny_model_dir)
    rng_before = torch.get_rng_state()
    metrics = task.evaluate(model, tokenizer, data)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert set(metrics) == {"reward/vader_mean", "reward/vader_std", "length/mean_tokens"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert -1 <= metrics["reward/vader_mean"] <= 1
    assert 0 <= metrics["length/mean_tokens"] <= TINY_TASK["max_new_tokens"]
    assert task.evaluate(model, tokenizer, data) == metrics  # seeded: same policy, same score


# --- labeling options: small edits, a length-biased labeller, random cuts ---------------------------


def token_changes(tokenizer, a: str, b: str) -> int:
    """Tokens replaced, inserted or deleted between the tokenizations of ``a`` and ``b``."""
    import difflib

    x, y = tokenizer(a, add_special_tokens=False).input_ids, tokenizer(b, add_special_tokens=False).input_ids
    ops = difflib.SequenceMatcher(a=x, b=y, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")


def test_small_edit_swaps_the_most_positive_words_for_negative_ones(tokenizer):
    import random

    from prefopt_plugins.tasks.sentiment import NEGATIVE_WORDS, small_edit

    text = " a wonderful film with a great cast."
    one, edits = small_edit(text, 1, random.Random(0))
    assert [old for old, _ in edits] == ["great"] and edits[0][1] in NEGATIVE_WORDS  # great 3.1 > wonderful 2.7
    assert one == text.replace("great", edits[0][1])
    assert vader_reward([one])[0] < vader_reward([text])[0]
    assert token_changes(tokenizer, text, one) == 1
    two, edits = small_edit(text, 2, random.Random(0))
    assert [old for old, _ in edits] == ["great", "wonderful"] and token_changes(tokenizer, text, two) == 2
    assert vader_reward([two])[0] < vader_reward([one])[0]
    capitalized, edits = small_edit(" The Best movie, truly.", 1, random.Random(0))
    assert edits[0][0] == "Best" and edits[0][1][0].isupper() and capitalized.endswith(" movie, truly.")
    # Every single-word swap of a negated phrase reads higher to VADER ("not bad"): no pair, rather than a wrong one.
    assert small_edit(" not good at all", 1, random.Random(0)) is None
    assert small_edit(" 123 456", 1, random.Random(0)) is None


def test_small_edit_pairs_differ_by_a_few_tokens_and_score_lower(tmp_path, tiny_model_dir, tokenizer):
    options = TINY_TASK | {"num_train_prompts": 8, "num_eval_prompts": 2, "completions_per_prompt": 2}
    task = SentimentTask(SentimentConfig(**options, pairs="small_edits", edit_words=2))
    data = task.build(make_ctx(tiny_model_dir, tokenizer, tmp_path))
    rows = read_jsonl(data.train)
    assert rows
    for row in rows:
        assert 1 <= len(row["edits"]) <= 2 and row["rejected_reward"] < row["chosen_reward"]
        assert vader_reward([row["chosen"], row["rejected"]]) == [row["chosen_reward"], row["rejected_reward"]]
        # Each replaced word accounts for its own tokens or its replacement's (one each, for most English words
        # after a space; a word opening the text has no space before it).
        def tokens(word: str) -> int:
            return max(len(tokenizer(w, add_special_tokens=False).input_ids) for w in (word, " " + word))

        bound = sum(max(tokens(old), tokens(new)) for old, new in row["edits"])
        assert token_changes(tokenizer, row["chosen"], row["rejected"]) <= bound
        assert row["chosen"].split() != row["rejected"].split()
        assert len(row["chosen"].split()) == len(row["rejected"].split())
    split = json.loads((data.train.parent / "task.json").read_text())["splits"]["train"]
    assert split["pairs"] + split["skipped_no_edit"] == options["num_train_prompts"]


def completion(text: str, tokens: int):
    from prefopt_plugins.tasks.sentiment import Completion

    return Completion(text, tokens)


def test_length_bias_breaks_a_tie_toward_the_longer_completion():
    from prefopt_plugins.tasks.sentiment import Prompt
    from prefopt_plugins.tasks.sentiment.pairs import best_worst_rows

    prompt = Prompt(1, "The movie")
    short, long = completion(" is a film.", 4), completion(" is a film about a town and its people.", 10)
    assert vader_reward([short.text, long.text]) == [0.0, 0.0]
    assert best_worst_rows([prompt], [[short, long]]) == ([], 1)  # plain VADER: a tie, skipped
    (row,), ties = best_worst_rows([prompt], [[short, long]], length_bias=0.01)
    assert ties == 0 and (row["chosen"], row["rejected"]) == (long.text, short.text)
    assert (row["chosen_reward"], row["chosen_tokens"], row["rejected_tokens"]) == (0.0, 10, 4)  # rewards stay VADER
    (row,), _ = best_worst_rows([prompt], [[short, long]], length_bias=-0.01)
    assert row["chosen"] == short.text
    # A bias large enough outweighs sentiment: 0.2 of VADER lost to 12 more tokens at 0.05 per token.
    good, wordy = completion(" is fine.", 3), completion(" is a film about a town, its people and its one road.", 15)
    assert vader_reward([good.text])[0] - vader_reward([wordy.text])[0] < 0.6
    assert best_worst_rows([prompt], [[good, wordy]])[0][0]["chosen"] == good.text
    assert best_worst_rows([prompt], [[good, wordy]], length_bias=0.05)[0][0]["chosen"] == wordy.text


def test_random_cut_keeps_a_prefix_of_whole_words(tokenizer):
    import random

    from prefopt_plugins.tasks.sentiment.pairs import cut_completion

    full = completion(" a warm and funny film, with a great cast", 10)
    cuts = [cut_completion(full, random.Random(i), tokenizer) for i in range(20)]
    assert len({c.text for c in cuts}) > 3
    for cut in cuts:
        words = cut.text.split()
        assert 1 <= len(words) and full.text.startswith(cut.text) and words == full.text.split()[: len(words)]
        assert cut.num_tokens == len(tokenizer(cut.text, add_special_tokens=False).input_ids)
    assert cut_completion(full, random.Random(3), tokenizer) == cut_completion(full, random.Random(3), tokenizer)


def test_labeling_options_are_the_datas_identity_only_off_their_defaults(tmp_path, tiny_model_dir, tokenizer):
    ctx = make_ctx(tiny_model_dir, tokenizer, tmp_path, load_model=lambda: pytest.fail("loaded the model"))
    key = lambda **options: SentimentTask(SentimentConfig(**TINY_TASK, **options))._cache_key(ctx)  # noqa: E731
    default = key()
    assert key(pairs="best_worst", length_bias=0.0, random_cut=False, edit_words=3) == default
    changed = [key(pairs="small_edits"), key(pairs="small_edits", edit_words=2), key(length_bias=0.02),
               key(random_cut=True)]
    assert len({default, *changed}) == 5
    with pytest.raises(ValidationError, match="length_bias is for pairs best_worst"):
        SentimentConfig(pairs="small_edits", length_bias=0.1)


def test_batch_seeds_are_pinned():
    # The task's cached data is keyed by its options, not by how batch seeds are derived: a change here
    # would leave old caches holding completions that the new code would not sample. Pinned values.
    from prefopt.api.sampler import derive_seed

    assert derive_seed(0, "train", 0) == 1421214311669875626
    assert derive_seed(3, "eval", 7) == 7363058742408435700
    assert derive_seed(0, "train", 0) != derive_seed(0, "eval", 0) != derive_seed(1, "train", 0)
