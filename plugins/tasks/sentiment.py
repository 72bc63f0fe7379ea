"""Controlled sentiment generation on real movie-review openings, scored by VADER.

The task of Rafailov et al. (2023), "Direct Preference Optimization: Your Language Model is Secretly
a Reward Model", arXiv:2305.18290, §6.1: prompts are prefixes of movie reviews and the policy should
continue them with positive sentiment. The paper samples continuations of IMDb prefixes from the
initial model and labels pairs with a sentiment classifier. Here the prefixes are the first few words of
the 10,605 human-rated movie-review snippets that ship with VADER, and the ground-truth reward is
VADER's compound score (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model for Sentiment
Analysis of Social Media Text", ICWSM), so no classifier download is needed.

Per prompt the policy's initial model samples ``completions_per_prompt`` continuations; the
highest-scoring one is ``chosen`` and the lowest ``rejected``; prompts whose best and worst score tie
are skipped (and counted in ``task.json``). The reward scores the continuation alone, since the
prompt is the same for both responses and only the continuation is the policy's doing.

Options change how pairs are labelled (each is part of the data's cache identity when not at its default;
``evaluate`` always scores the plain VADER reward):

- ``random_cut``: each sampled continuation is first cut after a random number of its words (uniform
  from 1 to all of them, drawn per completion), so lengths vary; the model rarely ends a continuation by
  itself within ``max_new_tokens``, so uncut completions are nearly all the same length.
- ``length_bias``: the labeller ranks by VADER + ``length_bias`` x tokens (a labeller that likes length:
  at equal sentiment the longer completion wins); ``chosen_reward``/``rejected_reward`` stay plain VADER
  and the rows add ``chosen_tokens``/``rejected_tokens``.
- ``pairs: small_edits``: ``chosen`` is the best completion as above, and ``rejected`` is a copy of it
  with up to ``edit_words`` words replaced by words VADER rates negative (see ``small_edit``), so the two
  differ by a few tokens and the rejected one scores lower. Prompts where no replacement lowers the
  score are skipped (``skipped_no_edit`` in ``task.json``); rows add ``edits`` ([old, new] per word).

The held-out split (its prompts, its pairs and the samples ``evaluate`` scores) follows the recipe seed
unless ``eval_seed`` is set; benchmarks set it, so runs of every seed are scored on the same prompts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from prefopt import Task, TaskConfig, TaskContext, TaskData, hookimpl
from prefopt.errors import PrefoptError
from prefopt.paths import cache_dir, publish, staging_dir
from prefopt.api.sampler import derive_seed
from prefopt.api.task import KL_METRIC, EvalOptions, completion_logps

log = logging.getLogger(__name__)

# The data lives only in VADER's source distribution (the wheel ships the lexicon, not the corpora).
SDIST_REQUIREMENT = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
CORPORA_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"

# Bump when the way files are built changes, so caches built by older code are not reused.
_BUILD_FORMAT = 1
_TRAIN, _EVAL, _EVAL_PROMPTS, _MANIFEST = "train.jsonl", "eval.jsonl", "eval_prompts.jsonl", "task.json"
# Labeling options left out of the cache identity at these defaults, so caches built before they existed
# stay valid.
_LABELING_DEFAULTS = {"pairs": "best_worst", "length_bias": 0.0, "random_cut": False}
# What a small edit puts in: common words VADER rates clearly negative (valence -1.3 to -3.1), each one
# SmolLM2 token after a space, so a one-word edit usually changes one token.
NEGATIVE_WORDS = ("bad", "awful", "terrible", "boring", "dull", "poor", "horrible", "worst", "weak",
                  "disappointing", "stupid", "ugly", "sad", "annoying")
# A word a small edit may replace: letters (an inner apostrophe allowed) between optional punctuation.
_EDITABLE = re.compile(r"([^\w\s]*)([A-Za-z]+(?:'[A-Za-z]+)?)([^\w\s]*)")
# Model files whose bytes decide what the model generates (not optimizer states or logs).
_MODEL_FILE_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.json", "*.jinja", "*.model", "*.txt")


# --- the corpus --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snippet:
    """One movie-review snippet with its mean human sentiment rating (-4 very negative .. +4)."""

    id: int
    rating: float
    text: str


@lru_cache(maxsize=1)
def load_snippets() -> tuple[Snippet, ...]:
    """The 10,605 rated movie-review snippets, read straight from VADER's sdist (downloaded once)."""
    sdist = _vader_sdist()
    with tarfile.open(sdist) as outer:
        corpora = outer.extractfile(CORPORA_MEMBER)
        with tarfile.open(fileobj=io.BytesIO(corpora.read())) as inner:
            raw = inner.extractfile(SNIPPETS_MEMBER).read()
    return tuple(_parse_snippets(raw.decode("utf-8"), source=f"{sdist}:{SNIPPETS_MEMBER}"))


def _parse_snippets(text: str, source: str) -> Iterable[Snippet]:
    # The file has CRLF line endings and no header: id <TAB> mean rating <TAB> text.
    for line_number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise PrefoptError(f"{source} line {line_number}: expected 3 tab-separated fields, got {len(fields)}")
        yield Snippet(int(fields[0]), float(fields[1]), fields[2])


def _vader_sdist() -> Path:
    path = cache_dir("assets") / SDIST_NAME
    if not path.is_file():
        _download_sdist(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise PrefoptError(f"{path} has sha256 {digest}, expected {SDIST_SHA256}; delete it to download it again")
    return path


def _download_sdist(path: Path) -> None:
    """``pip download`` the sdist into a private directory, then move the file into place."""
    with tempfile.TemporaryDirectory(prefix=".download-", dir=path.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   SDIST_REQUIREMENT, "-d", tmp]  # fmt: skip
        log.info("downloading the %s source distribution (once) into %s", SDIST_REQUIREMENT, path.parent)
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(tmp) / SDIST_NAME
        if result.returncode != 0 or not downloaded.is_file():
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise PrefoptError(
                f"could not download {SDIST_NAME} ({reason}); run `{' '.join(command[2:-2])} -d {path.parent}` "
                f"where PyPI is reachable and copy the file to {path}"
            )
        os.replace(downloaded, path)


# --- the reward --------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()  # reads its lexicon from disk: build it once


def vader_reward(texts: Sequence[str]) -> list[float]:
    """VADER compound sentiment of each text, in [-1, 1] (positive is better)."""
    analyzer = _vader()
    return [analyzer.polarity_scores(text)["compound"] for text in texts]


def completion_reward(prompts: Sequence, completions: Sequence[str]) -> list[float]:
    """The task's reward as a judge's reward function: VADER compound score of each completion alone.

    For ``algorithm.judge: {name: function, function: "prefopt_plugins.tasks.sentiment:completion_reward"}``.
    ``prompts`` (parallel to ``completions``) are ignored on purpose: the task's ground-truth reward, which
    labels its pairs and scores ``evaluate``'s samples, scores the continuation alone, since every
    completion of a prompt shares the prompt and only the continuation is the policy's doing. So a judge
    using this function ranks completions exactly as the task's own pairs and evaluation do.
    """
    return vader_reward(completions)


# --- configuration -----------------------------------------------------------------------------


class SentimentConfig(TaskConfig):
    num_train_prompts: int = Field(
        512, ge=1, le=8000, description="Snippet openings to sample training pairs for (ties are then skipped)."
    )
    num_eval_prompts: int = Field(
        128, ge=1, le=2000, description="Held-out openings (other snippets than training) for eval pairs and scoring."
    )
    completions_per_prompt: int = Field(
        4, ge=2, le=16, description="Continuations sampled per prompt; the best and worst by VADER form the pair."
    )
    max_new_tokens: int = Field(24, ge=1, le=256, description="Length limit of each sampled continuation, in tokens.")
    prompt_words_min: int = Field(4, ge=1, le=32, description="Fewest words of a snippet that make up its prompt.")
    prompt_words_max: int = Field(
        8, ge=1, le=32, description="Most words of a snippet in its prompt (drawn uniformly per prompt and seed)."
    )
    temperature: float = Field(1.0, gt=0, le=5, description="Sampling temperature; 1.0 samples the model as it is.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens only; 0 turns top-k off.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1.0 turns it off.")
    batch_size: int = Field(
        64,
        ge=1,
        le=4096,
        description="Sequences per generate call (prompts x completions). Part of the data's identity: "
        "the random stream is seeded per batch. 64 was fastest for SmolLM2-135M on a 2-core CPU.",
    )
    eval_samples_per_prompt: int = Field(
        1, ge=1, le=16, description="Continuations evaluate() samples per held-out prompt to score a policy."
    )
    eval_seed: Optional[int] = Field(
        None,
        ge=0,
        description="Seed of the held-out split: its prompts, its pairs and the samples evaluate() scores. "
        "None: the recipe seed. Set it to score runs of different seeds on the same held-out prompts.",
    )
    pairs: Literal["best_worst", "small_edits"] = Field(
        "best_worst",
        description="best_worst: the best vs the worst sampled completion. small_edits: the best completion vs "
        "a copy with up to edit_words words replaced by VADER-negative ones (a pair a few tokens apart).",
    )
    edit_words: int = Field(
        1, ge=1, le=4, description="pairs small_edits: most words replaced in the rejected copy (each lowers VADER)."
    )
    length_bias: float = Field(
        0.0,
        ge=-1,
        le=1,
        description="The labeller ranks completions by VADER + length_bias x tokens: > 0 prefers the longer one at "
        "equal sentiment. evaluate() still scores plain VADER. For pairs best_worst.",
    )
    random_cut: bool = Field(
        False,
        description="Cut each sampled completion after a random number of its words (1 to all) before labelling, "
        "so lengths vary (uncut ones nearly all reach max_new_tokens).",
    )

    @model_validator(mode="after")
    def _prompt_words_ordered(self) -> "SentimentConfig":
        if self.prompt_words_min > self.prompt_words_max:
            raise ValueError(
                f"prompt_words_min ({self.prompt_words_min}) must not exceed prompt_words_max ({self.prompt_words_max})"
            )
        if self.pairs == "small_edits" and self.length_bias != 0:
            raise ValueError("length_bias is for pairs best_worst: a small edit keeps the chosen completion's length")
        return self


# --- the task ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """The opening words of one snippet: what the policy is asked to continue."""

    snippet_id: int
    text: str


@dataclass(frozen=True)
class Completion:
    """One sampled continuation, decoded without special tokens and with its leading space."""

    text: str
    num_tokens: int  # generated tokens before EOS
    prompt_ids: tuple[int, ...] = ()  # the prompt as the model saw it
    token_ids: tuple[int, ...] = ()  # the sampled tokens, the EOS that ended them included


class SentimentTask(Task):
    """Controlled sentiment generation (DPO §6.1): continue movie-review openings positively; VADER scores."""

    name = "sentiment"
    Config = SentimentConfig
    paper = (
        "Rafailov et al. 2023, Direct Preference Optimization, arXiv:2305.18290 (§6.1); "
        "Hutto & Gilbert 2014, VADER, ICWSM"
    )
    reward_metric = "reward/vader_mean"
    length_metric = "length/mean_tokens"
    config: SentimentConfig

    def build(self, ctx: TaskContext) -> TaskData:
        out_dir = Path(ctx.cache_dir) / self._cache_key(ctx)
        data = TaskData(train=out_dir / _TRAIN, eval=out_dir / _EVAL, scored=out_dir / _EVAL_PROMPTS)
        if (out_dir / _MANIFEST).is_file():  # written last, so its presence means the build finished
            return data
        log.info("building sentiment task data (seed %d) in %s", ctx.seed, out_dir)
        staging = staging_dir(out_dir, "building")
        try:
            self._build_into(staging, ctx)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        publish(staging, out_dir, lambda target: (target / _MANIFEST).is_file())
        return data

    def evaluate(
        self, model, tokenizer, data: TaskData, reference=None, options: EvalOptions | None = None
    ) -> dict[str, float]:
        """Mean VADER reward and length of the policy's continuations of the held-out prompts; with
        ``reference``, also the KL of those continuations to it (see ``Task.evaluate``)."""
        out_dir = data.eval.parent
        if not (out_dir / _MANIFEST).is_file():
            raise PrefoptError(f"{out_dir} holds no {_MANIFEST}: evaluate() needs data built by this task's build()")
        manifest = json.loads((out_dir / _MANIFEST).read_text())
        options = options or EvalOptions()
        prompts = [Prompt(**row) for row in _read_jsonl(out_dir / _EVAL_PROMPTS)]
        if options.num_prompts is not None:
            if options.num_prompts > len(prompts):
                raise PrefoptError(
                    f"asked to evaluate on {options.num_prompts} prompts, but {out_dir / _EVAL_PROMPTS} holds "
                    f"{len(prompts)} held-out prompts; ask for fewer or raise data.task.num_eval_prompts"
                )
            prompts = prompts[: options.num_prompts]
        completions = self._sample(
            model, tokenizer, prompts, options.samples_per_prompt or self.config.eval_samples_per_prompt,
            seed=self._eval_seed(manifest["seed"]), purpose="evaluate", max_new_tokens=options.max_new_tokens,
        )  # fmt: skip
        flat = [c for per_prompt in completions for c in per_prompt]
        rewards = vader_reward([c.text for c in flat])
        metrics = {
            "reward/vader_mean": statistics.fmean(rewards),
            "reward/vader_std": statistics.pstdev(rewards),
            "length/mean_tokens": statistics.fmean(c.num_tokens for c in flat),
        }
        if reference is not None:
            # The same sampled tokens scored by both models: an unbiased estimate of KL(policy || reference)
            # when sampling is plain (temperature 1, no top-k or top-p, the defaults).
            sequences = [(c.prompt_ids, c.token_ids) for c in flat]
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            policy_logps = completion_logps(model, sequences, pad_id)
            reference_logps = completion_logps(reference, sequences, pad_id)
            metrics[KL_METRIC] = statistics.fmean(p - r for p, r in zip(policy_logps, reference_logps))
        return metrics

    def _eval_seed(self, seed: int) -> int:
        return self.config.eval_seed if self.config.eval_seed is not None else seed

    # --- building ---

    def _build_into(self, out_dir: Path, ctx: TaskContext) -> None:
        started = time.perf_counter()
        eval_seed = self._eval_seed(ctx.seed)
        train_prompts, eval_prompts = self._select_prompts(ctx.seed, eval_seed)
        model = ctx.load_model()
        splits = {
            "train": self._build_split(out_dir / _TRAIN, "train", train_prompts, model, ctx, ctx.seed),
            "eval": self._build_split(out_dir / _EVAL, "eval", eval_prompts, model, ctx, eval_seed),
        }
        _write_jsonl(out_dir / _EVAL_PROMPTS, [{"snippet_id": p.snippet_id, "text": p.text} for p in eval_prompts])
        manifest = {
            "task": self.name,
            "seed": ctx.seed,
            "eval_seed": eval_seed,
            "model_id": ctx.model_id,
            "config": self.config.model_dump(mode="json"),
            "splits": splits,
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        # Written last: its presence is what marks a finished build.
        (out_dir / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    def _build_split(self, path: Path, split: str, prompts: list[Prompt], model, ctx: TaskContext, seed: int) -> dict:
        """Sample, score and pair one split into ``path``; returns its summary for ``task.json``."""
        started = time.perf_counter()
        cfg = self.config
        completions = self._sample(
            model, ctx.tokenizer, prompts, cfg.completions_per_prompt, seed=seed, purpose=split,
            show_progress=ctx.show_progress,
        )  # fmt: skip
        if cfg.random_cut:
            completions = [[_cut(c, random.Random(f"sentiment-cut:{seed}:{p.snippet_id}:{j}"), ctx.tokenizer)
                            for j, c in enumerate(candidates)] for p, candidates in zip(prompts, completions)]
        if cfg.pairs == "small_edits":
            rows, skipped = _small_edit_rows(prompts, completions, cfg.edit_words, seed)
            skipped_key = "skipped_no_edit"
        else:
            rows, skipped = _preference_rows(prompts, completions, cfg.length_bias)
            skipped_key = "skipped_ties"
        _write_jsonl(path, rows)
        summary = _split_summary(len(prompts), rows, skipped, seconds=time.perf_counter() - started,
                                 skipped_key=skipped_key)
        log.info(
            "sentiment %s: %d pairs, %d prompts skipped (%s), mean VADER chosen %.3f / rejected %.3f",
            split, len(rows), skipped, skipped_key, summary["mean_chosen_reward"], summary["mean_rejected_reward"],
        )  # fmt: skip
        return summary

    def _select_prompts(self, seed: int, eval_seed: int) -> tuple[list[Prompt], list[Prompt]]:
        """Disjoint snippets for train and eval, each cut to its first n words (n drawn per prompt). The
        held-out snippets are drawn with ``eval_seed``, the training ones with ``seed`` from the rest."""
        cfg = self.config
        # A prompt must leave at least one word of its snippet unseen, or it is the whole review.
        usable = [s for s in load_snippets() if len(s.text.split()) > cfg.prompt_words_min]
        wanted = cfg.num_train_prompts + cfg.num_eval_prompts
        if wanted > len(usable):
            raise PrefoptError(
                f"data.task: num_train_prompts + num_eval_prompts = {wanted}, but only {len(usable)} snippets have "
                f"more than prompt_words_min={cfg.prompt_words_min} words; ask for fewer prompts"
            )
        # A full shuffle (not rng.sample) keeps the order independent of how many prompts are wanted:
        # the held-out prompts come first and stay the same when num_train_prompts changes.
        eval_order = _shuffled(usable, eval_seed)
        held_out = eval_order[: cfg.num_eval_prompts]
        # With eval_seed == seed this is eval_order[num_eval_prompts:], the split as it always was.
        held_out_ids = {snippet.id for snippet in held_out}
        train_order = eval_order if eval_seed == seed else _shuffled(usable, seed)
        train = [snippet for snippet in train_order if snippet.id not in held_out_ids][: cfg.num_train_prompts]
        return [self._opening(s, seed) for s in train], [self._opening(s, eval_seed) for s in held_out]

    def _opening(self, snippet: Snippet, seed: int) -> Prompt:
        """The first n words of ``snippet``; n is drawn from a generator of its own (seed, snippet)."""
        words = snippet.text.split()
        rng = random.Random(f"sentiment-words:{seed}:{snippet.id}")
        n = min(rng.randint(self.config.prompt_words_min, self.config.prompt_words_max), len(words) - 1)
        return Prompt(snippet.id, " ".join(words[:n]))

    def _cache_key(self, ctx: TaskContext) -> str:
        import transformers  # imported here, not at plugin load, so `prefopt list` stays fast

        identity = {
            "task": self.name,
            "format": _BUILD_FORMAT,
            "corpus": SDIST_SHA256,
            "config": self.config.model_dump(mode="json", exclude={"eval_seed", "edit_words", *_LABELING_DEFAULTS}),
            "seed": ctx.seed,
            "model": _model_identity(ctx.model_id),
            "tokenizer": _tokenizer_identity(ctx.tokenizer),
            # Sampled tokens can change with the kernels and the generation code.
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        eval_seed = self._eval_seed(ctx.seed)
        if eval_seed != ctx.seed:  # only then are the files different; equal seeds keep earlier caches valid
            identity["eval_seed"] = eval_seed
        labeling = {key: getattr(self.config, key) for key, default in _LABELING_DEFAULTS.items()
                    if getattr(self.config, key) != default}
        if self.config.pairs == "small_edits":
            labeling["edit_words"] = self.config.edit_words
        if labeling:  # likewise: at the defaults, caches built before these options existed stay valid
            identity["labeling"] = labeling
        return f"{self.name}-{_sha256_json(identity)[:16]}"

    # --- sampling ---

    def _sample(
        self, model, tokenizer, prompts: list[Prompt], per_prompt: int, seed: int, purpose: str,
        show_progress: bool = False, max_new_tokens: int | None = None,
    ) -> list[list[Completion]]:  # fmt: skip
        """``per_prompt`` sampled continuations of each prompt, the same for the same seed and batch size."""
        prompts_per_batch = max(1, self.config.batch_size // per_prompt)
        batches = [prompts[i : i + prompts_per_batch] for i in range(0, len(prompts), prompts_per_batch)]
        was_training = model.training
        model.eval()
        results: list[list[Completion]] = []
        try:
            bar = tqdm(total=len(prompts) * per_prompt, desc=f"sentiment {purpose}", unit="seq",
                       disable=not show_progress)  # fmt: skip
            with bar, torch.inference_mode():
                for index, batch in enumerate(batches):
                    batch_seed = derive_seed(seed, purpose, index)
                    results.extend(self._sample_batch(model, tokenizer, [p.text for p in batch], per_prompt,
                                                      batch_seed, max_new_tokens or self.config.max_new_tokens))
                    bar.update(len(batch) * per_prompt)
        finally:
            model.train(was_training)
        return results

    def _sample_batch(
        self, model, tokenizer, texts: list[str], per_prompt: int, seed: int, max_new_tokens: int
    ) -> list[list[Completion]]:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos_ids = _eos_ids(model, tokenizer)
        prompt_ids = [ids for ids in tokenizer(texts).input_ids for _ in range(per_prompt)]
        input_ids, attention_mask = _left_pad(prompt_ids, pad_id, device=model.device)
        # generate() draws from the global generator; fork it so sampling neither depends on nor disturbs
        # the caller's random state.
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=self.config.temperature,
                top_k=self.config.top_k,
                top_p=self.config.top_p,
                repetition_penalty=1.0,  # plain sampling even if the model's generation config says otherwise
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_ids,
            )
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        completions = [_completion(tokenizer, tokens, eos_ids, ids) for tokens, ids in zip(new_tokens, prompt_ids)]
        return [completions[i : i + per_prompt] for i in range(0, len(completions), per_prompt)]


# --- helpers -----------------------------------------------------------------------------------


def _preference_rows(
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


def _small_edit_rows(
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
    lexicon = _vader().lexicon
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


def _cut(completion: Completion, rng: random.Random, tokenizer) -> Completion:
    """``completion`` cut after a random number of its words (1 to all, uniform); its tokens counted by
    tokenizing the kept text. Token ids are dropped: only the text is labelled and trained on."""
    words = re.findall(r"\s*\S+", completion.text)
    if not words:
        return completion
    text = "".join(words[: rng.randint(1, len(words))])
    return Completion(text, len(tokenizer(text, add_special_tokens=False).input_ids), completion.prompt_ids)


def _split_summary(num_prompts: int, rows: list[dict], skipped: int, seconds: float,
                   skipped_key: str = "skipped_ties") -> dict:  # fmt: skip
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


def _completion(tokenizer, tokens: list[int], eos_ids: list[int], prompt_ids: Sequence[int] = ()) -> Completion:
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
    # Keep the leading space and exact spacing: prompt + completion must read as the sampled text.
    text = tokenizer.decode(tokens[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    # What was sampled ends at the EOS (generate pads after it); the EOS itself was a sampled choice.
    sampled = tokens[: end + 1] if end < len(tokens) else tokens
    return Completion(text, end, tuple(prompt_ids), tuple(sampled))


def _eos_ids(model, tokenizer) -> list[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    return list(configured) if isinstance(configured, (list, tuple)) else [configured]


def _left_pad(sequences: list[list[int]], pad_id: int, device):
    """Left-pad by hand, so the caller's tokenizer (its padding side) is left as it was."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _shuffled(snippets: Sequence[Snippet], seed: int) -> list[Snippet]:
    order = list(snippets)
    random.Random(f"sentiment-order:{seed}").shuffle(order)
    return order


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _model_identity(model_id: str) -> str:
    """Hash of the files that decide the model's outputs; a hub id (not a directory) stands for itself."""
    directory = Path(model_id)
    if not directory.is_dir():
        return model_id
    files = sorted({p for pattern in _MODEL_FILE_PATTERNS for p in directory.glob(pattern) if p.is_file()})
    return _sha256_json([[p.name, _file_sha256(str(p), *_stat_key(p))] for p in files])


def _stat_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # Memoized on (path, size, mtime): hashing 0.5 GB of weights takes ~0.4 s, once per process.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _tokenizer_identity(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(map(str, tokenizer.all_special_tokens))
    return _sha256_json([type(tokenizer).__name__, vocab, special])


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@hookimpl
def prefopt_register_tasks():
    return [SentimentTask]
