"""Completions while training (``eval.samples``): a few held-out prompts, sampled as the policy learns.

Before the first step (with ``eval.at_start``), every ``eval.samples.every`` steps (``train.eval_every`` when
unset) and at the end, the main process samples ``per_prompt`` completions of the first ``num_prompts``
held-out prompts through the sampler plugin the recipe names, scores them with the task's ``score`` and the
recipe's judge where there are, and logs them three ways: one JSON line per completion in
``<output.dir>/samples.jsonl``, a table to every tracker (``trackers.log_table``), and their means to
``metrics.jsonl`` (``eval/samples/*``). The other processes wait.

The prompts are the task's (``Task.eval_prompts``), else the distinct prompts of the held-out rows
(``data.eval_split``, or the task's held-out file), tokenized as training tokenizes prompts. The samples of
step N are drawn before step N + 1 trains, from the weights checkpoint N holds, seeded from the recipe's seed
and N: a run resumed at N samples again exactly what the interrupted run sampled there, after
``samples.jsonl`` is cut back to the steps before N (so no step appears twice).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from prefopt.api.judge import JudgeContext
from prefopt.api.sampler import Sample, SamplerContext, derive_seed
from prefopt.api.task import Text
from prefopt.engine.distributed import sharded_params
from prefopt.engine.records import append_line, cut_jsonl, record
from prefopt.engine.run import Run
from prefopt.engine.trackers import log_table
from prefopt.errors import PrefoptError

__all__ = ["SAMPLES_FILE", "TABLE", "Completions", "build_completions", "cut_back", "log_completions"]

SAMPLES_FILE = "samples.jsonl"
TABLE = "completions"  # the trackers' name of the table
SEED_PURPOSE = "prefopt-eval-samples"  # keeps these samples' random streams apart from every other use


@dataclass(frozen=True)
class HeldOutPrompt:
    text: Text  # as the data wrote it (text or chat messages): what the task and the judge read
    ids: tuple[int, ...]  # as training tokenizes it: what the sampler continues


class Completions:
    """What ``eval.samples`` samples and scores with. The plugins' options are checked when the run is set up;
    the prompts, the sampler and the judge are made on the main process when it first samples."""

    def __init__(self, spec, sampler: tuple[type, Any], judge: tuple[type, Any] | None) -> None:
        self.spec, self.sampler_parts, self.judge_parts = spec, sampler, judge
        self.prompts: list[HeldOutPrompt] | None = None
        self.sampler = self.judge = None
        self.file_cut = False  # whether samples.jsonl was cut back to where this run started

    def due(self, step: int, recipe) -> bool:
        """Whether the completions of step ``step`` (steps done) are sampled while training (the end's always are)."""
        if step == 0:
            return recipe.eval.at_start
        every = self.spec.every or recipe.train.eval_every
        return every is not None and step % every == 0

    def sample(self, run: Run, step: int) -> list[dict]:
        """The records of step ``step``: one per completion, its scores included (main process)."""
        prompts, sampler = self._prompts(run), self._sampler(run)
        sampler.load_weights(run.accelerator.unwrap_model(run.policy))
        seed = derive_seed(SEED_PURPOSE, run.recipe.seed, step)
        groups = sampler.sample([prompt.ids for prompt in prompts], self.spec.per_prompt, seed=seed)
        flat = [(index, k, prompt, sample) for index, (prompt, group) in enumerate(zip(prompts, groups))
                for k, sample in enumerate(group)]
        scores = self._scores(run, [prompt.text for _, _, prompt, _ in flat], [s.text for *_, s in flat])
        return [_record(step, index, k, prompt, sample, {name: values[i] for name, values in scores.items()})
                for i, (index, k, prompt, sample) in enumerate(flat)]

    def close(self) -> None:
        for part in (self.sampler, self.judge):
            if part is not None:
                part.close()
        self.sampler = self.judge = None

    def _prompts(self, run: Run) -> list[HeldOutPrompt]:
        if self.prompts is None:
            self.prompts = held_out_prompts(run, self.spec.num_prompts)
        return self.prompts

    def _sampler(self, run: Run):
        if self.sampler is None:
            from prefopt.models.loading import resolve_model_path

            cls, config = self.sampler_parts
            m = run.recipe.model
            self.sampler = cls(config, SamplerContext(
                model_path=resolve_model_path(m.path), tokenizer=run.tokenizer, dtype=m.dtype,
                trust_remote_code=m.trust_remote_code, device=str(run.accelerator.device), seed=run.recipe.seed,
            ))
        return self.sampler

    def _scores(self, run: Run, prompts: list[Text], texts: list[str]) -> dict[str, list[float]]:
        """Each completion's score by the task and by the judge, where there are."""
        scores: dict[str, list[float]] = {}
        task_scores = run.task.score(prompts, texts) if run.task is not None else None
        if task_scores is not None:
            scores["task"] = _checked(task_scores, len(texts), f"task {run.task.name!r}: score()")
        if self.judge_parts is not None:
            if self.judge is None:
                cls, config = self.judge_parts
                self.judge = cls(config, JudgeContext(device=str(run.accelerator.device), seed=run.recipe.seed))
            scores["judge"] = _checked(self.judge.scores(prompts, texts), len(texts),
                                       f"eval.samples.judge {self.judge.name!r}")
        return scores


def build_completions(recipe, plugins, accelerator) -> Completions | None:
    """What ``eval.samples`` asks for, its plugins' options checked (one line naming the recipe key), or None."""
    from prefopt.recipe.samples import samples_plugins

    parts = samples_plugins(recipe, plugins)  # validation checked this already; a recipe built in code may skip it
    if parts is None:
        return None
    if sharded_params(accelerator):
        raise PrefoptError("eval.samples: sampling needs the whole model in one process, and under FSDP or DeepSpeed "
                           "ZeRO-3 each process holds a shard; train with DDP or on one process, or remove "
                           "eval.samples")
    sampler, judge = parts
    return Completions(recipe.eval.samples, sampler, judge)


def log_completions(run: Run, step: int, *, final: bool = False) -> None:
    """Sample, score and log the completions of step ``step`` (optimizer steps done) when it is a step to sample
    at, or when ``final`` (the run's end, which then frees the sampler and the judge). Every process calls it;
    the main one samples while the others wait."""
    completions = run.completions
    if completions is None:
        return
    path = run.run_dir / SAMPLES_FILE
    if run.is_main and not completions.file_cut:  # the first call of this run, at the step it starts from
        cut_back(path, run.start_step)
        completions.file_cut = True
    values: dict[str, float] = {}
    if final or completions.due(step, run.recipe):
        if run.is_main:
            records = completions.sample(run, step)
            append_line(path, "\n".join(json.dumps(r, ensure_ascii=False) for r in records))  # whole or not at all
            log_table(run.accelerator, TABLE, *table(records), step=step)
            values = means(records)
            run.say(f"samples step {step}: {len(records)} completions in {path.name}; " + ", ".join(
                f"{key.removeprefix('eval/samples/')}={value:.4g}" for key, value in values.items()))
        run.accelerator.wait_for_everyone()
        # measured before the step that follows: a run resumed at ``step`` measures it again
        record(run, run.run_dir / "metrics.jsonl", step, values, before_step=True)
    if final:
        completions.close()


# ----------------------------------------------------------------------------------------------------------
# the prompts


def held_out_prompts(run: Run, count: int) -> list[HeldOutPrompt]:
    """The first ``count`` held-out prompts (the task's own, else the held-out rows' distinct prompts), tokenized
    as training tokenizes prompts; a prompt too long to leave room for a completion is left out."""
    from prefopt.judged.prompts import prompt_texts, tokenized

    texts, source = prompt_texts(run.recipe, run.task, run.task_data)
    texts = texts[:count]  # fewer than asked for is fine here: these are examples, not a comparison
    if not texts:
        raise PrefoptError(f"eval.samples: {source} holds no prompts")
    prompts = tokenized(texts, run.tokenizer, run.recipe.data, f"eval.samples: {source}")
    return [HeldOutPrompt(text, ids) for text, ids in zip(prompts.texts, prompts.ids)]


# ----------------------------------------------------------------------------------------------------------
# the records, the table and the means


def _record(step: int, index: int, k: int, prompt: HeldOutPrompt, sample: Sample, scores: dict[str, float]) -> dict:
    """One line of samples.jsonl; ``tokens`` counts the sampled tokens, the EOS that ended them included."""
    line = {"step": step, "prompt_index": index, "sample": k, "prompt": prompt.text, "completion": sample.text,
            "tokens": len(sample.token_ids), "finished": sample.finished}
    if scores:
        line["scores"] = scores
    return line


def table(records: list[dict]) -> tuple[list[str], list[list[Any]]]:
    """The records as the trackers' table: columns, then one row per completion."""
    score_names = list(records[0].get("scores", {})) if records else []
    columns = ["step", "prompt_index", "sample", "prompt", "completion", "tokens", "finished",
               *(f"score/{name}" for name in score_names)]
    rows = [[r["step"], r["prompt_index"], r["sample"], prompt_text(r["prompt"]), r["completion"], r["tokens"],
             r["finished"], *(r["scores"][name] for name in score_names)] for r in records]
    return columns, rows


def prompt_text(prompt: Text) -> str:
    """A prompt as one string: chat messages as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{message.get('role', '?')}: {message.get('content', '')}" for message in prompt)


def means(records: list[dict]) -> dict[str, float]:
    """The metrics of one sampling: mean length, the share that ended with EOS, each scorer's mean score."""
    values = {
        "eval/samples/tokens": statistics.fmean(r["tokens"] for r in records),
        "eval/samples/finished": statistics.fmean(float(r["finished"]) for r in records),
    }
    for name in records[0].get("scores", {}):
        values[f"eval/samples/score/{name}"] = statistics.fmean(r["scores"][name] for r in records)
    return values


def _checked(scores, count: int, who: str) -> list[float]:
    values = [float(value) for value in scores]
    if len(values) != count:
        raise PrefoptError(f"{who} returned {len(values)} scores for {count} completions; it must return one each")
    return values


# ----------------------------------------------------------------------------------------------------------
# samples.jsonl on resume


def cut_back(path: Path, step: int, say: Callable[[str], None] = tqdm.write) -> None:
    """Keep the lines of the steps before ``step``, where a run resumes (it samples ``step`` again, if it is a step
    to sample at); torn and damaged lines as in metrics.jsonl (``records.cut_jsonl``)."""
    cut_jsonl(path, lambda record: record["step"] < step, "samples", say)
