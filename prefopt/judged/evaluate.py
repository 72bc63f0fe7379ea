"""Judged evaluation: a model's completions of held-out prompts, each scored, measured and compared.

``judge_completions`` samples ``per_prompt`` completions of every prompt (``prefopt.judged.sampling``: the
same seed gives the same completions), scores them with a scorer (a task's ``score``, a score judge's
``scores``; none for a pairwise judge, which only compares) and, given a reference model, scores the same
tokens under both models for the KL. It returns one ``JudgedRecord`` per completion and their means.

A task's ``evaluate`` is this with the task's prompts and scorer; a bench on any data is this with the held-out
rows' prompts and the bench's judge, and then compares each record with the initial model's record of the
same prompt and sample (``outcomes``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from prefopt.api.judge import PairwiseJudge
from prefopt.api.sampler import SamplerConfig
from prefopt.api.task import KL_METRIC, Text, completion_logps
from prefopt.errors import PrefoptError
from prefopt.judged.winrate import (
    length_controlled_win_rate, outcome_from_both_orders, outcome_from_scores, win_rate,
)

__all__ = ["JudgedEval", "JudgedOptions", "JudgedRecord", "judge_completions", "judged_metrics", "outcomes",
           "win_rates"]

# scorer(prompts, completions) -> one score per completion, higher is better; or None: it scores none.
Scorer = Callable[[Sequence[Text], Sequence[str]], Optional[Sequence[float]]]


@dataclass(frozen=True)
class JudgedOptions:
    """How completions are sampled: ``per_prompt`` of each prompt, seeded from ``seed`` and ``purpose``, in
    generate calls of ``batch_size`` sequences, on top of the model's generation config."""

    per_prompt: int
    seed: int
    purpose: str = "evaluate"
    batch_size: int = 64
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                             top_k=self.top_k)


@dataclass(frozen=True)
class JudgedRecord:
    """One completion: where it comes from, what it says, its score and its log-probabilities."""

    prompt_index: int  # the prompt's place in the list evaluated
    sample: int  # which of the prompt's completions (0 .. per_prompt - 1)
    prompt: Text
    completion: str
    num_tokens: int  # generated tokens before EOS
    finished: bool  # ended with EOS (else it reached max_new_tokens)
    score: float | None  # the scorer's; None without one
    logp_policy: float | None  # summed over the completion's tokens, its EOS included; None without a reference
    logp_reference: float | None
    prompt_ids: tuple[int, ...] = field(default=(), repr=False)  # kept in memory only
    token_ids: tuple[int, ...] = field(default=(), repr=False)

    @property
    def kl(self) -> float | None:
        """log policy(y|x) - log reference(y|x): its mean over samples estimates the sequence KL."""
        if self.logp_policy is None or self.logp_reference is None:
            return None
        return self.logp_policy - self.logp_reference

    def as_line(self, outcome: float | None = None) -> dict:
        """The record as one JSON line of a completions file (no token ids)."""
        return {"prompt_index": self.prompt_index, "sample": self.sample, "prompt": self.prompt,
                "completion": self.completion, "num_tokens": self.num_tokens, "finished": self.finished,
                "score": self.score, "kl": self.kl, "outcome": outcome}


@dataclass(frozen=True)
class JudgedEval:
    """Every completion's record, prompt by prompt, and their means."""

    records: list[JudgedRecord]

    @property
    def mean_score(self) -> float | None:
        scores = self._scores()
        return statistics.fmean(scores) if scores is not None else None

    @property
    def std_score(self) -> float | None:
        """The population standard deviation: the spread of these completions' scores, not an estimate."""
        scores = self._scores()
        return statistics.pstdev(scores) if scores is not None else None

    @property
    def mean_length(self) -> float:
        return statistics.fmean(r.num_tokens for r in self.records)

    @property
    def kl(self) -> float | None:
        """The mean of log policy - log reference over the completions: an unbiased estimate of
        KL(policy || reference) when sampling is plain (temperature 1, no top-k or top-p, the defaults)."""
        values = [r.kl for r in self.records]
        return statistics.fmean(values) if values and None not in values else None

    def _scores(self) -> list[float] | None:
        scores = [r.score for r in self.records]
        return scores if scores and None not in scores else None


def judged_metrics(judged: JudgedEval) -> dict[str, float]:
    """The means as metrics: ``reward/mean``, ``reward/std`` (with scores), ``length/mean_tokens`` and, with a
    reference, ``KL_METRIC``."""
    metrics = {"reward/mean": judged.mean_score, "reward/std": judged.std_score,
               "length/mean_tokens": judged.mean_length, KL_METRIC: judged.kl}
    return {key: value for key, value in metrics.items() if value is not None}


def judge_completions(
    model, tokenizer, prompts: Sequence[Text], scorer: Scorer | None, reference, options: JudgedOptions, *,
    prompt_ids: Sequence[Sequence[int]] | None = None, show_progress: bool = False,
) -> JudgedEval:  # fmt: skip
    """``options.per_prompt`` completions of each prompt sampled from ``model``, scored by ``scorer`` and, with
    ``reference`` (a model sharing the tokenizer), scored under both models for the KL.

    ``prompt_ids`` are the prompts as the model sees them (chat messages rendered by the chat template, say);
    without them every prompt is a text, tokenized as ``tokenizer`` tokenizes plain text."""
    from prefopt.judged.sampling import model_sampler, sample_completions, sample_prompt_ids

    if not prompts:
        raise PrefoptError("judged evaluation: no prompts to sample")
    sampler = model_sampler(model, tokenizer, options.sampler_config())
    try:
        if prompt_ids is None:
            if not all(isinstance(prompt, str) for prompt in prompts):
                raise ValueError("prompts that are chat messages need their prompt_ids (rendered by the chat template)")
            groups = sample_completions(sampler, tokenizer, prompts, options.per_prompt, options.seed,
                                        options.purpose, options.batch_size, show_progress)
        else:
            if len(prompt_ids) != len(prompts):
                raise ValueError(f"{len(prompt_ids)} prompt_ids for {len(prompts)} prompts")
            groups = sample_prompt_ids(sampler, prompt_ids, options.per_prompt, options.seed, options.purpose,
                                       options.batch_size, show_progress)
    finally:
        sampler.close()
    flat = [(index, k, completion) for index, group in enumerate(groups) for k, completion in enumerate(group)]
    completions = [completion for *_, completion in flat]
    scores = _scores(scorer, [prompts[index] for index, _, _ in flat], [c.text for c in completions])
    policy_logps, reference_logps = _logps(model, reference, tokenizer, completions)
    return JudgedEval([
        JudgedRecord(index, k, prompts[index], c.text, c.num_tokens, c.finished, scores[i], policy_logps[i],
                     reference_logps[i], c.prompt_ids, c.token_ids)
        for i, (index, k, c) in enumerate(flat)
    ])  # fmt: skip


def _scores(scorer: Scorer | None, prompts: list[Text], texts: list[str]) -> list[float | None]:
    returned = scorer(prompts, texts) if scorer is not None else None
    if returned is None:
        return [None] * len(texts)
    scores = [float(value) for value in returned]
    if len(scores) != len(texts):
        raise PrefoptError(f"the scorer returned {len(scores)} scores for {len(texts)} completions; it must return "
                           "one each, in order")
    bad = next((i for i, score in enumerate(scores) if not math.isfinite(score)), None)
    if bad is not None:
        raise PrefoptError(f"the scorer returned a non-finite score ({scores[bad]}) at index {bad}; every score "
                           "must be a finite number")
    return scores


def _logps(model, reference, tokenizer, completions) -> tuple[list, list]:
    """Each completion's summed log-probability under the policy and the reference (None each without one)."""
    if reference is None:
        return [None] * len(completions), [None] * len(completions)
    sequences = [(c.prompt_ids, c.token_ids) for c in completions]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return completion_logps(model, sequences, pad_id), completion_logps(reference, sequences, pad_id)


# ----------------------------------------------------------------------------------------------------------
# against a baseline's completions


def outcomes(records: Sequence[dict], baseline: Sequence[dict], judge=None) -> list[float | None]:
    """Each record's outcome against the baseline's record with the same (prompt_index, sample) and prompt: 1 a
    win, 0.5 a tie, 0 a loss, None where the baseline has no such record (or no score to compare).

    Records are completions-file lines (``JudgedRecord.as_line``). With a ``PairwiseJudge`` the judge is asked
    both orders (its preference for a position cancels); otherwise the two scores are compared."""
    by_key = {(line["prompt_index"], line["sample"]): line for line in baseline}
    matched = []
    for line in records:
        other = by_key.get((line["prompt_index"], line["sample"]))
        # The same prompt too: an entry whose data settings leave out other prompts must not be compared askew.
        matched.append(other if other is not None and other["prompt"] == line["prompt"] else None)
    if isinstance(judge, PairwiseJudge):
        return _pairwise_outcomes(judge, records, matched)
    return [outcome_from_scores(line["score"], other["score"])
            if other is not None and line["score"] is not None and other["score"] is not None else None
            for line, other in zip(records, matched)]


def win_rates(records: Sequence[dict], baseline: Sequence[dict]) -> dict[str, float | None]:
    """``win_rate`` and ``lc_win_rate`` (at equal length) of the records whose ``outcome`` is set, each against the
    baseline's record of the same (prompt_index, sample); None each when no record has an outcome."""
    by_key = {(line["prompt_index"], line["sample"]): line for line in baseline}
    compared = [line for line in records if line["outcome"] is not None]
    results = [line["outcome"] for line in compared]
    baseline_lengths = [by_key[(line["prompt_index"], line["sample"])]["num_tokens"] for line in compared]
    return {"win_rate": win_rate(results),
            "lc_win_rate": length_controlled_win_rate(results, [line["num_tokens"] for line in compared],
                                                      baseline_lengths)}


def _pairwise_outcomes(judge: PairwiseJudge, records: Sequence[dict], matched: list[dict | None]) -> list:
    asked = [i for i, other in enumerate(matched) if other is not None]
    prompts = [records[i]["prompt"] for i in asked]
    candidate = [records[i]["completion"] for i in asked]
    baseline = [matched[i]["completion"] for i in asked]
    found: list[float | None] = [None] * len(records)
    if not asked:
        return found
    candidate_first = _preferences(judge, prompts, candidate, baseline)
    baseline_first = _preferences(judge, prompts, baseline, candidate)
    for i, p_candidate, p_baseline in zip(asked, candidate_first, baseline_first):
        found[i] = outcome_from_both_orders(p_candidate, p_baseline)
    return found


def _preferences(judge: PairwiseJudge, prompts: list, first: list[str], second: list[str]) -> list[float]:
    values = [float(p) for p in judge.prefer(prompts, first, second)]
    if len(values) != len(first):
        raise PrefoptError(f"judge {judge.name!r} returned {len(values)} preferences for {len(first)} pairs; it "
                           "must return one each")
    bad = next((i for i, p in enumerate(values) if not 0.0 <= p <= 1.0), None)  # NaN fails both comparisons
    if bad is not None:
        raise PrefoptError(f"judge {judge.name!r} returned {values[bad]} at index {bad}; prefer() must return "
                           "probabilities in [0, 1] that the first completion is the better one")
    return values
