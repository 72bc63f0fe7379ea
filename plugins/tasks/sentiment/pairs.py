"""Pairs from sampled completions, and the files a build writes.

Per prompt the task samples N completions and pairs them: ``best_worst_rows`` (the best vs the worst by the
labeller's score) or ``small_edit_rows`` (the best vs a copy of it with a few words made negative);
``random_cut`` first shortens each completion to a random number of its words. Each split is written as
JSON lines in the standard preference format, plus the held-out prompts and a manifest (``task.json``).
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from pathlib import Path
from typing import Iterable

from prefopt import Completion

from prefopt_plugins.tasks.sentiment.corpus import Prompt
from prefopt_plugins.tasks.sentiment.reward import analyzer, vader_reward

# The files of a build; task.json describes it (its MANIFEST.json, written after them all, marks it finished).
TRAIN_FILE, EVAL_FILE, EVAL_PROMPTS_FILE, TASK_FILE = "train.jsonl", "eval.jsonl", "eval_prompts.jsonl", "task.json"
# What a small edit puts in: common words VADER rates clearly negative (valence -1.3 to -3.1), each one
# SmolLM2 token after a space, so a one-word edit usually changes one token.
NEGATIVE_WORDS = ("bad", "awful", "terrible", "boring", "dull", "poor", "horrible", "worst", "weak",
                  "disappointing", "stupid", "ugly", "sad", "annoying")
# A word a small edit may replace: letters (an inner apostrophe allowed) between optional punctuation.
_EDITABLE = re.compile(r"([^\w\s]*)([A-Za-z]+(?:'[A-Za-z]+)?)([^\w\s]*)")


def label_split(
    prompts: list[Prompt], completions: list[list[Completion]], config, seed: int, tokenizer
) -> tuple[list[dict], int, str]:
    """One split's rows as ``config`` (the task's ``SentimentConfig``) asks, how many prompts gave no pair,
    and the ``task.json`` key that counts them."""
    if config.random_cut:
        completions = random_cuts(prompts, completions, seed, tokenizer)
    if config.pairs == "small_edits":
        rows, skipped = small_edit_rows(prompts, completions, config.edit_words, seed)
        return rows, skipped, "skipped_no_edit"
    rows, ties = best_worst_rows(prompts, completions, config.length_bias)
    return rows, ties, "skipped_ties"


def best_worst_rows(
    prompts: list[Prompt], completions: list[list[Completion]], length_bias: float = 0.0
) -> tuple[list[dict], int]:
    """Best-vs-worst pair per prompt by the labeller's score, VADER + ``length_bias`` x tokens; prompts whose
    best and worst score tie are skipped and counted. The rows' rewards are plain VADER."""
    rows, ties = [], 0
    for prompt, candidates in zip(prompts, completions):
        rewards = vader_reward([c.text for c in candidates])
        scores = [r + length_bias * c.num_tokens for r, c in zip(rewards, candidates)] if length_bias else rewards
        best = max(range(len(scores)), key=scores.__getitem__)
        worst = min(range(len(scores)), key=scores.__getitem__)
        if scores[best] == scores[worst]:
            ties += 1
            continue
        row = {
            "prompt": prompt.text,
            "chosen": candidates[best].text,
            "rejected": candidates[worst].text,
            "chosen_reward": rewards[best],
            "rejected_reward": rewards[worst],
            "snippet_id": prompt.snippet_id,
        }
        if length_bias:
            row.update(chosen_tokens=candidates[best].num_tokens, rejected_tokens=candidates[worst].num_tokens)
        rows.append(row)
    return rows, ties


def small_edit_rows(
    prompts: list[Prompt], completions: list[list[Completion]], edit_words: int, seed: int
) -> tuple[list[dict], int]:
    """The best completion per prompt (by VADER) against a copy of it changed by ``small_edit``; prompts
    where no edit lowers the score are skipped and counted."""
    rows, skipped = [], 0
    for prompt, candidates in zip(prompts, completions):
        rewards = vader_reward([c.text for c in candidates])
        best = max(range(len(rewards)), key=rewards.__getitem__)
        rng = random.Random(f"sentiment-edit:{seed}:{prompt.snippet_id}")
        edited = small_edit(candidates[best].text, edit_words, rng)
        if edited is None:
            skipped += 1
            continue
        rejected, edits = edited
        rows.append({
            "prompt": prompt.text,
            "chosen": candidates[best].text,
            "rejected": rejected,
            "chosen_reward": rewards[best],
            "rejected_reward": vader_reward([rejected])[0],
            "snippet_id": prompt.snippet_id,
            "edits": edits,
        })  # fmt: skip
    return rows, skipped


def small_edit(text: str, edit_words: int, rng: random.Random) -> tuple[str, list[list[str]]] | None:
    """``text`` with up to ``edit_words`` words replaced by words of ``NEGATIVE_WORDS``, each replacement
    kept only if it lowers the VADER score of the text so far; None when none does.

    Candidates are the words of letters (punctuation around them kept, an inner apostrophe allowed), tried
    in order of VADER lexicon valence, most positive first; words of equal valence (the many neutral ones)
    in text order. Each try draws its replacement from ``rng``; a capitalized word gets a capitalized
    replacement. Whitespace is kept exactly, so the texts differ only in the replaced words. The check
    catches edits VADER reads otherwise (a negated "not good" turned "not bad" scores higher)."""
    lexicon = analyzer().lexicon
    pieces = re.split(r"(\s+)", text)  # words at even indices, the whitespace between them at odd ones
    candidates = []
    for index in range(0, len(pieces), 2):
        match = _EDITABLE.fullmatch(pieces[index])
        if match:
            candidates.append((-lexicon.get(match[2].lower(), 0.0), index, match))
    candidates.sort(key=lambda c: c[:2])
    score, edits = vader_reward([text])[0], []
    for _, index, match in candidates:
        if len(edits) == edit_words:
            break
        word = rng.choice(NEGATIVE_WORDS)
        word = word.capitalize() if match[2][0].isupper() else word
        trial = [*pieces[:index], match[1] + word + match[3], *pieces[index + 1 :]]
        trial_score = vader_reward(["".join(trial)])[0]
        if trial_score < score:
            pieces, score = trial, trial_score
            edits.append([match[2], word])
    return ("".join(pieces), edits) if edits else None


def random_cuts(
    prompts: list[Prompt], completions: list[list[Completion]], seed: int, tokenizer
) -> list[list[Completion]]:
    """Every completion cut by ``cut_completion``, each with a generator of its own (seed, snippet, index)."""
    return [[cut_completion(c, random.Random(f"sentiment-cut:{seed}:{p.snippet_id}:{j}"), tokenizer)
             for j, c in enumerate(candidates)] for p, candidates in zip(prompts, completions)]  # fmt: skip


def cut_completion(completion: Completion, rng: random.Random, tokenizer) -> Completion:
    """``completion`` cut after a random number of its words (1 to all, uniform); its tokens counted by
    tokenizing the kept text. Token ids are dropped: only the text is labelled and trained on."""
    words = re.findall(r"\s*\S+", completion.text)
    if not words:
        return completion
    text = "".join(words[: rng.randint(1, len(words))])
    return Completion(text, len(tokenizer(text, add_special_tokens=False).input_ids), completion.prompt_ids)


def split_summary(num_prompts: int, rows: list[dict], skipped: int, seconds: float,
                  skipped_key: str = "skipped_ties") -> dict:  # fmt: skip
    """One split's entry in ``task.json``: counts, mean rewards (and lengths, when rows carry them), time."""

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in rows) if rows else math.nan

    summary = {
        "prompts": num_prompts,
        "pairs": len(rows),
        skipped_key: skipped,
        "mean_chosen_reward": mean("chosen_reward"),
        "mean_rejected_reward": mean("rejected_reward"),
        "seconds": round(seconds, 1),
    }
    if rows and "chosen_tokens" in rows[0]:
        summary.update(mean_chosen_tokens=mean("chosen_tokens"), mean_rejected_tokens=mean("rejected_tokens"))
    return summary


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
