"""On-policy rounds: online DPO, iterative DPO and iLR-DPO, for any paired loss plugin.

Every round samples completions of some training prompts from the current policy (a sampler plugin:
vLLM with the weights pushed into the running engine, or transformers ``generate``), lets a judge plugin
pick the best and the worst completion of each prompt, and trains on those pairs; prompts whose
completions tie give no pair. The three algorithms differ only in their defaults:

==============  ==================  =================  ===========================  =================
algorithm       samples per prompt  prompts per round  steps per round              reference
==============  ==================  =================  ===========================  =================
online_dpo      2                   train.batch_size   1                            the initial model
iterative_dpo   4                   all of them        a pass over them x epochs    the previous round's
ilr_dpo         4                   all of them        a pass over them x epochs    the previous round's
==============  ==================  =================  ===========================  =================

ilr_dpo is iterative DPO whose loss must be the length-regularized ``rdpo`` (Liu et al. 2024); judge it
with a reward model as the paper does. The run is one engine run: the policy, its optimizer state and
the learning-rate schedule carry across rounds, and ``reference: previous`` makes the reference a copy of
the policy synced at the start of every round (the previous round's final model), so no model is saved
and reloaded between rounds.

Data: only the training prompts are read, so prompt-only data (``data.format: prompt_only``, TRL's
prompt-only format: a ``prompt`` column of text or messages) works as well as preference data, whose
distinct prompts are used. Held-out pair metrics need preference data in ``data.eval_split``.

Files: ``<output.dir>/rounds/round-<r>.jsonl`` holds each round's prompts, completions, scores and the
chosen and rejected completion, written before the round trains. A rerun resumes from the newest
checkpoint and reads the round it was in from its file, so it trains on exactly the same pairs.

Several processes: the main process samples and judges (one sampler engine, one judge), writes the round
file and broadcasts the pairs; every process then trains on its share of each step, as in offline runs.
Weights sharded across processes (FSDP, ZeRO-3) are refused: the sampler needs the whole model.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch
from pydantic import Field

from prefopt import (
    Algorithm, AlgorithmConfig, Phase, PhaseContext, PluginSpec, derive_recipe, hookimpl, plugin_config,
)
from prefopt.api.algorithm import check_on_policy_recipe, check_on_policy_run
from prefopt.data.types import TokenizedPair, TokenizedPairs
from prefopt.errors import PrefoptError
from prefopt.api.judge import JudgeContext
from prefopt.api.sampler import SamplerContext

from .round_files import read_round, write_round

ROUNDS_DIR = "rounds"


class RoundsConfig(AlgorithmConfig):
    rounds: int = Field(..., ge=1, le=100_000, description="Rounds of sample, judge, train.")
    prompts_per_round: Optional[int] = Field(
        None, ge=1, description="Training prompts sampled each round, drawn in a seeded order that goes through "
        "all of them before repeating one (default: see the algorithm).",
    )
    samples_per_prompt: int = Field(2, ge=2, le=64, description="Completions sampled per prompt; the judge's best "
                                    "and worst form its pair.")
    steps_per_round: Optional[int] = Field(
        None, ge=1, description="Optimizer steps on each round's pairs; a round with fewer pairs than the steps "
        "take goes through them again in a new order (default: see the algorithm).",
    )
    reference: Literal["initial", "previous"] = Field(
        "initial", description="initial: the model training started from (online DPO); previous: the policy as "
        "it was at the start of the round (iterative DPO).",
    )
    sampler: PluginSpec = Field(PluginSpec(name="transformers"), description="Sampler plugin: {name: vllm | "
                                "transformers, max_new_tokens, temperature, ...}.")
    judge: PluginSpec = Field(..., description="Judge plugin: {name: function | reward_model | llm_pairwise | ..., ...}.")
    eval_every_rounds: Optional[int] = Field(
        1, ge=1, description="Run the task's evaluator (eval.task_metrics) at the start of every this many rounds.",
    )


class OnlineDPOConfig(RoundsConfig):
    steps_per_round: Optional[int] = Field(1, ge=1, description=RoundsConfig.model_fields["steps_per_round"].description)
    # a round is one step here, so the task's evaluator runs at the start and the end unless asked
    eval_every_rounds: Optional[int] = Field(None, ge=1, description=RoundsConfig.model_fields["eval_every_rounds"].description)


class IterativeDPOConfig(RoundsConfig):
    samples_per_prompt: int = Field(4, ge=2, le=64, description=RoundsConfig.model_fields["samples_per_prompt"].description)
    reference: Literal["initial", "previous"] = Field("previous", description=RoundsConfig.model_fields["reference"].description)


class OnlineRounds(Algorithm):
    """Base of the round-based on-policy algorithms (see the module docstring)."""

    Config = RoundsConfig
    # prompts_per_round when unset: every training prompt (iterative) or one batch per step (online).
    all_prompts_by_default: ClassVar[bool] = False
    pairs_from_prompts = True  # every pair is sampled and judged, so prompt-only data is enough

    # ------------------------------------------------------------------------------------------------------
    # checks, before anything loads

    def check(self, recipe, plugins=None) -> None:
        check_on_policy_recipe(self.name, recipe)
        if recipe.data.format == "unpaired":
            raise PrefoptError(f"algorithm {self.name} builds pairs; data.format unpaired has no use here")
        if plugins is not None:
            plugin_config(plugins.samplers, self.config.sampler, "algorithm.sampler")
            plugin_config(plugins.judges, self.config.judge, "algorithm.judge")

    # ------------------------------------------------------------------------------------------------------
    # the run

    def run(self, recipe, plugins, *, show_progress: bool = True) -> dict:
        from prefopt import engine

        self.check(recipe, plugins)
        # a fixed reference must score new completions, so it is live, never a cache
        derived = derive_recipe(recipe, plugins, {"algorithm": None, "reference.kind": "live"},
                                f"{recipe.output.dir} ({self.name})")
        return engine.train(derived, plugins, phase=RoundsPhase(self, plugins), show_progress=show_progress)


class OnlineDPO(OnlineRounds):
    """Online DPO: each step samples two completions per prompt from the current policy and a judge labels them.

    Guo et al. (2024), "Direct Language Model Alignment from Online AI Feedback", arXiv:2402.04792. Any paired
    loss plugin trains on the fresh pairs (the paper: DPO, IPO, SLiC) against the initial model.
    """

    name = "online_dpo"
    Config = OnlineDPOConfig
    paper = "Guo et al. 2024, Direct Language Model Alignment from Online AI Feedback, arXiv:2402.04792"


class IterativeDPO(OnlineRounds):
    """Iterative DPO: rounds of sampling the prompt set from the policy, judging, and training against the previous round.

    Xiong et al. (2024), "Iterative Preference Learning from Human Feedback: Bridging Theory and Practice for
    RLHF under KL-Constraint", arXiv:2312.11456; Xu et al. (2023), "Some things are more CRINGE than others",
    arXiv:2312.16682. Each round's reference is the policy the round started from.
    """

    name = "iterative_dpo"
    Config = IterativeDPOConfig
    paper = "Xiong et al. 2024, Iterative Preference Learning from Human Feedback, arXiv:2312.11456"
    all_prompts_by_default = True


class IterativeLengthRegularizedDPO(IterativeDPO):
    """iLR-DPO: iterative DPO with the R-DPO length penalty, labelled by a reward model.

    Liu et al. (2024), "Iterative Length-Regularized Direct Preference Optimization: A Case Study on Improving
    7B Language Models to GPT-4 Level", arXiv:2406.11817. The loss is R-DPO's, -log sigmoid(beta m + alpha
    (|y_l| - |y_w|)) (loss ``rdpo``, its ``alpha`` the length penalty); the paper runs 3 rounds, judges with
    a reward model and keeps the previous iterate as the reference (the last is inferred, not stated).
    """

    name = "ilr_dpo"
    paper = ("Liu et al. 2024, Iterative Length-Regularized Direct Preference Optimization, arXiv:2406.11817")

    def check(self, recipe, plugins=None) -> None:
        if recipe.loss.name != "rdpo":
            raise PrefoptError(f"algorithm ilr_dpo trains the length-regularized loss: set loss.name=rdpo (with its "
                               f"alpha, the length penalty), not {recipe.loss.name!r}, or use iterative_dpo")
        super().check(recipe, plugins)


# ----------------------------------------------------------------------------------------------------------
# the rounds, driven from the engine's step hooks


class RoundsPhase(Phase):
    """One engine run fed round by round: samples, judges and writes each round, and trains on its pairs."""

    def __init__(self, algorithm: OnlineRounds, plugins) -> None:
        super().__init__(reference_follows_policy=algorithm.config.reference == "previous", plans_own_steps=True,
                         pairs_from_prompts=algorithm.pairs_from_prompts)
        self.config, self.name, self.plugins = algorithm.config, algorithm.name, plugins
        self.all_prompts_by_default = algorithm.all_prompts_by_default
        self.sampler = self.judge = None
        self.loaded_round = 0

    # --- the engine's hooks

    def start(self, ctx: PhaseContext) -> None:
        check_on_policy_run(self.name, ctx)
        ctx.summary["algorithm"] = self.name
        self.ctx, self.recipe = ctx, ctx.recipe
        self.rows_dir = Path(ctx.recipe.output.dir) / ROUNDS_DIR
        self.prompts = self._prompts(ctx.train_pairs, ctx.train_rows, ctx.recipe.data.columns.prompt)
        t, cfg, n = ctx.recipe.train, self.config, len(self.prompts)
        default = n if self.all_prompts_by_default else t.batch_size * (cfg.steps_per_round or 1)
        self.prompts_per_round = cfg.prompts_per_round or min(n, default)
        if self.prompts_per_round > n:
            raise PrefoptError(f"algorithm.prompts_per_round ({self.prompts_per_round}) exceeds the {n} distinct "
                               f"prompts of {ctx.train_pairs.source}")
        self.steps_per_round = cfg.steps_per_round or t.epochs * max(1, self.prompts_per_round // t.batch_size)
        planned = cfg.rounds * self.steps_per_round
        self.planned_steps = min(planned, t.max_steps) if t.max_steps is not None else planned
        resuming = f", resuming after step {ctx.start_step}" if ctx.start_step else ""
        ctx.say(f"{self.name}: {cfg.rounds} rounds of {self.prompts_per_round} prompts x {cfg.samples_per_prompt} "
                f"samples, {self.steps_per_round} steps each ({self.planned_steps} steps{resuming})")

    def total_steps(self, ctx: PhaseContext) -> int:
        return self.planned_steps

    def steps_per_epoch(self, ctx: PhaseContext) -> int:
        return self.steps_per_round  # the logged "epoch" counts rounds

    def before_step(self, ctx: PhaseContext, step: int) -> dict[str, float]:
        index, offset = divmod(step, self.steps_per_round)
        index += 1  # rounds count from 1
        metrics: dict[str, float] = {}
        if index != self.loaded_round:
            if offset == 0 and index > 1 and self.config.eval_every_rounds and \
                    (index - 1) % self.config.eval_every_rounds == 0:
                metrics.update(ctx.evaluate_task())
            measured = self._load_round(index)
            if offset == 0:  # a run resumed mid-round logged this round's line before it stopped
                metrics.update(measured)
                ctx.say(_round_line(index, self.config.rounds, metrics))
        if offset == 0 and index > 1 and ctx.follows_policy:
            ctx.sync_reference(1.0)  # the reference becomes the policy this round starts from
        return metrics

    def pairs_of_step(self, step: int) -> list[int]:
        """The round's pairs in a seeded order, gone through again (in a new order) when the round's steps
        need more pairs than it has."""
        index, offset = divmod(step, self.steps_per_round)
        seed = (self.recipe.seed * 1_000_003 + index) * 1_009
        return _cycled_slice(len(self.ctx.train_pairs), self.recipe.train.batch_size, offset, seed)

    def close(self) -> None:
        for part in (self.sampler, self.judge):
            if part is not None:
                part.close()
        self.sampler = self.judge = None

    # --- one round

    def _load_round(self, index: int) -> dict[str, float]:
        """Round ``index``'s pairs into the run: from its file when it was already sampled, else sampled now
        (by the main process, broadcast to the others)."""
        from accelerate.utils import broadcast_object_list

        ctx = self.ctx
        path = self.rows_dir / f"round-{index:05d}.jsonl"
        timings: dict[str, float] = {}
        payload = [None]
        if ctx.is_main:
            if not path.exists():
                records, timings = self._sample_round(index)
                write_round(path, records)
            payload = [read_round(path, index, (index - 1) * self.steps_per_round)]
        if ctx.num_processes > 1:
            broadcast_object_list(payload, from_process=0)
        records = [json.loads(line) for line in payload[0].splitlines() if line]
        pairs = [
            TokenizedPair(row=r["row"], prompt_ids=tuple(r["prompt_ids"]),
                          chosen_ids=tuple(r["completions"][r["chosen"]]["token_ids"]),
                          rejected_ids=tuple(r["completions"][r["rejected"]]["token_ids"]))
            for r in records if r["chosen"] is not None
        ]
        if not pairs:
            raise PrefoptError(
                f"round {index}: the judge tied every prompt's {self.config.samples_per_prompt} completions ({path}); "
                "raise algorithm.samples_per_prompt or the sampler's temperature, or lower algorithm.judge.min_margin"
            )
        ctx.replace_train_pairs(TokenizedPairs(
            source=f"{self.name} round {index}", pairs=pairs,
            fingerprint=hashlib.sha256(payload[0].encode()).hexdigest(),
        ))
        self.loaded_round = index
        return {**_round_metrics(index, records), **timings}

    def _sample_round(self, index: int) -> tuple[list[dict], dict[str, float]]:
        cfg = self.config
        self._build_parts()
        picked = self._round_prompts(index)
        started = time.perf_counter()
        self.sampler.load_weights(self.ctx.model)
        synced = time.perf_counter()
        samples = self.sampler.sample([self.prompts[i]["ids"] for i in picked], cfg.samples_per_prompt,
                                      seed=self.recipe.seed * 1_000_003 + index)
        sampled = time.perf_counter()
        judge_prompts = [self.prompts[i]["prompt"] for i in picked]
        choices = self.judge.pick(judge_prompts, [[s.text for s in group] for group in samples])
        judged = time.perf_counter()
        records = []
        for i, group, choice in zip(picked, samples, choices):
            p = self.prompts[i]
            records.append({
                "row": p["row"], "prompt": p["prompt"], "prompt_ids": list(p["ids"]),
                "completions": [{"text": s.text, "token_ids": list(s.token_ids), "finished": s.finished}
                                for s in group],
                "scores": list(choice.scores) if choice is not None else None,
                "chosen": choice.chosen if choice is not None else None,
                "rejected": choice.rejected if choice is not None else None,
            })
        timings = {"time/sync_s": synced - started, "time/sample_s": sampled - synced, "time/judge_s": judged - sampled}
        tokens = sum(len(s.token_ids) for group in samples for s in group)
        timings["round/sample_tokens_per_s"] = tokens / max(1e-9, sampled - synced)
        return records, timings

    def _round_prompts(self, index: int) -> list[int]:
        """Round ``index``'s prompts: consecutive slices of seeded permutations of all prompts."""
        return _cycled_slice(len(self.prompts), self.prompts_per_round, index - 1, self.recipe.seed * 7_919)

    def _build_parts(self) -> None:
        if self.sampler is not None:
            return
        ctx, m = self.ctx, self.recipe.model
        from prefopt.models.loading import resolve_model_path

        sampler_cls, sampler_config = plugin_config(self.plugins.samplers, self.config.sampler,
                                                                 "algorithm.sampler")
        judge_cls, judge_config = plugin_config(self.plugins.judges, self.config.judge, "algorithm.judge")
        device = str(ctx.device)
        self.sampler = sampler_cls(sampler_config, SamplerContext(
            model_path=resolve_model_path(m.path), tokenizer=ctx.tokenizer, dtype=m.dtype,
            trust_remote_code=m.trust_remote_code, device=device, seed=self.recipe.seed,
        ))
        self.judge = judge_cls(judge_config, JudgeContext(device=device, seed=self.recipe.seed))

    @staticmethod
    def _prompts(pairs: TokenizedPairs, rows, prompt_column: str) -> list[dict]:
        """The distinct prompts of the training pairs (or of prompt-only data, whose pairs have no responses),
        in order of first appearance: token ids, source row, and the prompt as the data wrote it (what a judge
        reads; None if the rows have no prompt column)."""
        seen: dict[tuple[int, ...], dict] = {}
        has_column = rows is not None and prompt_column in rows.column_names
        for pair in pairs.pairs:
            if pair.prompt_ids in seen:
                continue
            prompt = rows[pair.row][prompt_column] if has_column else None
            seen[pair.prompt_ids] = {"ids": pair.prompt_ids, "row": pair.row, "prompt": prompt}
        return list(seen.values())


def _cycled_slice(n: int, size: int, k: int, seed: int) -> list[int]:
    """The ``k``-th slice of ``size`` in an endless run of seeded permutations of range(n), a new
    permutation (seed + its number) each time one is used up: every index once before any repeats."""
    picked: list[int] = []
    position = k * size
    while len(picked) < size:
        lap, within = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + lap)).tolist()
        take = order[within : within + size - len(picked)]
        picked.extend(take)
        position += len(take)
    return picked


def _round_metrics(index: int, records: list[dict]) -> dict[str, float]:
    """What a round's file says: how many pairs, how the judge scored, how long the completions were."""
    judged = [r for r in records if r["scores"] is not None]
    lengths = [len(c["token_ids"]) for r in records for c in r["completions"]]
    finished = [c["finished"] for r in records for c in r["completions"]]
    metrics = {
        "round/index": float(index), "round/prompts": float(len(records)), "round/pairs": float(len(judged)),
        "round/ties": float(len(records) - len(judged)),
        "round/completion_tokens": statistics.fmean(lengths) if lengths else 0.0,
        "round/unfinished": 1.0 - statistics.fmean(finished) if finished else 0.0,
    }
    if judged:
        metrics["round/score_mean"] = statistics.fmean(s for r in judged for s in r["scores"])
        metrics["round/chosen_score"] = statistics.fmean(r["scores"][r["chosen"]] for r in judged)
        metrics["round/rejected_score"] = statistics.fmean(r["scores"][r["rejected"]] for r in judged)
    return metrics


def _round_line(index: int, rounds: int, metrics: dict[str, float]) -> str:
    """One console line per round: what the judge made of the samples, and the held-out reward if measured."""
    line = f"round {index}/{rounds}: {metrics['round/pairs']:.0f} pairs, {metrics['round/ties']:.0f} ties"
    if "round/chosen_score" in metrics:
        line += (f"; judge: mean {metrics['round/score_mean']:.3f}, chosen {metrics['round/chosen_score']:.3f}, "
                 f"rejected {metrics['round/rejected_score']:.3f}")
    if "time/sample_s" in metrics:
        line += f"; sampled in {metrics['time/sample_s']:.1f} s, weights synced in {metrics['time/sync_s']:.2f} s"
    evaluated = ", ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in sorted(metrics.items())
                          if k.startswith("eval/"))
    return line + (f"; eval: {evaluated}" if evaluated else "")


@hookimpl
def prefopt_register_algorithms():
    return [OnlineDPO, IterativeDPO, IterativeLengthRegularizedDPO]
