"""The ``sentiment`` task plugin: its options, ``build`` (sample, pair, write, cache) and ``evaluate``.

``evaluate`` is the core's judged evaluation (``prefopt.judge_completions``) of the task's pieces: its held-out
prompts (``eval_prompts``), its VADER reward (``score``) and its sampling settings (``eval_sampling``)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Literal, Optional, Sequence

from pydantic import Field, model_validator

from prefopt import (
    Completion, JudgedOptions, SamplerConfig, Task, TaskConfig, TaskContext, TaskData, hookimpl, judge_completions,
    model_sampler, sample_completions,
)
from prefopt.api.task import KL_METRIC, EvalOptions
from prefopt.errors import PrefoptError

from prefopt_plugins.tasks.sentiment import pairs
from prefopt_plugins.tasks.sentiment.cache_key import data_key
from prefopt_plugins.tasks.sentiment.corpus import Prompt, select_prompts
from prefopt_plugins.tasks.sentiment.pairs import EVAL_FILE, EVAL_PROMPTS_FILE, TASK_FILE, TRAIN_FILE
from prefopt_plugins.tasks.sentiment.reward import vader_reward
from prefopt_plugins.tasks.sentiment.store import find_or_build

log = logging.getLogger(__package__)


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
        data = TaskData(train=out_dir / TRAIN_FILE, eval=out_dir / EVAL_FILE, scored=out_dir / EVAL_PROMPTS_FILE)

        def build_into(staging: Path) -> None:
            log.info("building sentiment task data (seed %d) in %s", ctx.seed, out_dir)
            self._build_into(staging, ctx)

        find_or_build(out_dir, build_into)  # reused when its checksums agree, else built (again)
        return data

    def evaluate(
        self, model, tokenizer, data: TaskData, reference=None, options: EvalOptions | None = None
    ) -> dict[str, float]:
        """Mean VADER reward and length of the policy's continuations of the held-out prompts; with
        ``reference``, also the KL of those continuations to it (see ``Task.evaluate``)."""
        options = options or EvalOptions()
        sampling = self.eval_sampling(data, options)  # first: it checks that the build is this task's
        prompts = self._eval_prompts(data.eval.parent / EVAL_PROMPTS_FILE, options.num_prompts)
        judged = judge_completions(model, tokenizer, [p.text for p in prompts], self.score, reference, sampling)
        metrics = {
            "reward/vader_mean": judged.mean_score,
            "reward/vader_std": judged.std_score,
            "length/mean_tokens": judged.mean_length,
        }
        if reference is not None:
            metrics[KL_METRIC] = judged.kl
        return metrics

    def eval_sampling(self, data: TaskData, options: EvalOptions) -> JudgedOptions:
        """The task's sampling settings, seeded by the held-out split's seed; ``options`` may set the samples
        per prompt and the length limit."""
        out_dir = data.eval.parent
        if not (out_dir / TASK_FILE).is_file():
            raise PrefoptError(
                f"{out_dir} holds no {TASK_FILE}: evaluate() needs data built by this task's build()"
            )
        manifest = json.loads((out_dir / TASK_FILE).read_text())
        cfg = self.config
        return JudgedOptions(
            per_prompt=options.samples_per_prompt or cfg.eval_samples_per_prompt,
            seed=self._eval_seed(manifest["seed"]), purpose="evaluate", batch_size=cfg.batch_size,
            max_new_tokens=options.max_new_tokens or cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        )  # fmt: skip

    def eval_prompts(self, data: TaskData) -> list[str]:
        """The held-out openings ``evaluate`` continues, in its order."""
        return [prompt.text for prompt in self._eval_prompts(data.eval.parent / EVAL_PROMPTS_FILE, None)]

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """VADER compound sentiment of each continuation alone, as ``evaluate`` scores it."""
        return vader_reward(completions)

    def _eval_prompts(self, path: Path, num_prompts: int | None) -> list[Prompt]:
        """The held-out prompts of a build, the first ``num_prompts`` of them when that is set."""
        prompts = [Prompt(**row) for row in pairs.read_jsonl(path)]
        if num_prompts is None:
            return prompts
        if num_prompts > len(prompts):
            raise PrefoptError(
                f"asked to evaluate on {num_prompts} prompts, but {path} holds "
                f"{len(prompts)} held-out prompts; ask for fewer or raise data.task.num_eval_prompts"
            )
        return prompts[:num_prompts]

    def _eval_seed(self, seed: int) -> int:
        return self.config.eval_seed if self.config.eval_seed is not None else seed

    def _cache_key(self, ctx: TaskContext) -> str:
        return data_key(self.name, self.config, ctx.seed, self._eval_seed(ctx.seed), ctx.model_id, ctx.tokenizer)

    # --- building ---

    def _build_into(self, out_dir: Path, ctx: TaskContext) -> None:
        started = time.perf_counter()
        cfg = self.config
        eval_seed = self._eval_seed(ctx.seed)
        train_prompts, eval_prompts = select_prompts(
            cfg.num_train_prompts, cfg.num_eval_prompts, cfg.prompt_words_min, cfg.prompt_words_max,
            seed=ctx.seed, eval_seed=eval_seed,
        )  # fmt: skip
        model = ctx.load_model()
        splits = {
            "train": self._build_split(out_dir / TRAIN_FILE, "train", train_prompts, model, ctx, ctx.seed),
            "eval": self._build_split(out_dir / EVAL_FILE, "eval", eval_prompts, model, ctx, eval_seed),
        }
        pairs.write_jsonl(out_dir / EVAL_PROMPTS_FILE, [{"snippet_id": p.snippet_id, "text": p.text}
                                                         for p in eval_prompts])  # fmt: skip
        manifest = {
            "task": self.name,
            "seed": ctx.seed,
            "eval_seed": eval_seed,
            "model_id": ctx.model_id,
            "config": cfg.model_dump(mode="json"),
            "splits": splits,
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        # The build's description; find_or_build then writes MANIFEST.json, which marks it finished.
        (out_dir / TASK_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

    def _build_split(self, path: Path, split: str, prompts: list[Prompt], model, ctx: TaskContext, seed: int) -> dict:
        """Sample, score and pair one split into ``path``; returns its summary for ``task.json``."""
        started = time.perf_counter()
        completions = self._sample(model, ctx.tokenizer, prompts, self.config.completions_per_prompt, seed=seed,
                                   purpose=split, show_progress=ctx.show_progress)  # fmt: skip
        rows, skipped, skipped_key = pairs.label_split(prompts, completions, self.config, seed, ctx.tokenizer)
        pairs.write_jsonl(path, rows)
        summary = pairs.split_summary(len(prompts), rows, skipped, seconds=time.perf_counter() - started,
                                      skipped_key=skipped_key)  # fmt: skip
        log.info(
            "sentiment %s: %d pairs, %d prompts skipped (%s), mean VADER chosen %.3f / rejected %.3f",
            split, len(rows), skipped, skipped_key, summary["mean_chosen_reward"], summary["mean_rejected_reward"],
        )  # fmt: skip
        return summary

    def _sample(
        self, model, tokenizer, prompts: list[Prompt], per_prompt: int, seed: int, purpose: str,
        show_progress: bool = False,
    ) -> list[list[Completion]]:  # fmt: skip
        """``per_prompt`` continuations of each prompt sampled from ``model`` with the task's settings."""
        cfg = self.config
        sampler_config = SamplerConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       top_p=cfg.top_p, top_k=cfg.top_k)  # fmt: skip
        sampler = model_sampler(model, tokenizer, sampler_config)
        try:
            return sample_completions(sampler, tokenizer, prompts, per_prompt, seed, purpose, cfg.batch_size,
                                      show_progress=show_progress, label="sentiment")  # fmt: skip
        finally:
            sampler.close()


@hookimpl
def prefopt_register_tasks():
    return [SentimentTask]
