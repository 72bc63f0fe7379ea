"""The evaluation child: sample each run's completions of the held-out prompts and judge them.

    python -m prefopt.bench.evaluate --options JSON [--initial | --baseline FILE] RECIPE [RECIPE ...]

Each RECIPE is a run's derived training recipe (``bench-recipe.yaml`` in its run directory); the result goes
to ``bench-eval.json`` beside it, and every completion to ``bench-completions.jsonl``. The policy is the run's
saved model (``<output.dir>/model``; a LoRA adapter is merged into its base model in memory), or with
``--initial`` the initial model itself. The reference is the run's: ``reference.path`` when set, else the
initial model, so the KL of the initial model to its own reference is 0. A separate process from training,
so that loading two models here does not count in the run's peak memory; one process evaluates all seeds of
an entry, loading the reference (and the judge) once.

One code path for any data (``prefopt.judged.judge_completions``): the held-out prompts are the task's
(``Task.eval_prompts``), else the distinct prompts of the held-out rows; the scorer is the bench's judge
(``eval.judge``), else the task's ``score``; the sampling is the task's (``Task.eval_sampling``), else the
bench's ``eval`` settings; ``eval.seed`` overrides either's seed. Every completion is then compared with the
initial model's completion of the same prompt and sample (``--baseline``, the initial model's completions
file; same prompts and seeds, so they match by prompt index and sample): by score, or by a pairwise judge
asked both ways round, which gives win rates and no reward. A task with only ``evaluate`` (no ``score``)
and no judge is called through ``evaluate`` as before (``call_evaluate``): reward, KL and length, no win rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import sys
import time
from pathlib import Path

from prefopt.errors import PrefoptError
from prefopt.api.task import KL_METRIC, EvalOptions, Task
from prefopt.bench.files import COMPLETIONS_FILE, EVAL_FILE, read_completions, write_json
from prefopt.bench.recipe import EvalSpec

FALLBACK_SEED = "fallback_seed"  # the options' key of the seed used when neither eval.seed nor the task sets one


def recipe_digest(text: str) -> str:
    """Identifies the recipe an evaluation was made for, so a changed recipe is evaluated again."""
    return hashlib.sha256(text.encode()).hexdigest()


def options_record(spec: EvalSpec, fallback_seed: int) -> dict:
    """Everything that decides an evaluation besides the run's recipe: the bench's ``eval`` section (the judge
    and its options, the sampling settings) and the seed used when neither ``eval.seed`` nor the task sets one
    (the bench's first seed). A current evaluation recorded the same; the child is handed it as ``--options``."""
    return {**spec.record(), FALLBACK_SEED: fallback_seed}


def parse_options(text: str) -> tuple[EvalSpec, int]:
    record = json.loads(text)
    fallback_seed = record.pop(FALLBACK_SEED, 0)
    return EvalSpec.model_validate(record), fallback_seed


def call_evaluate(task: Task, model, tokenizer, data, reference, options: EvalOptions) -> dict[str, float]:
    """``task.evaluate`` with the reference and options when the task takes them: tasks written before
    these arguments existed take (model, tokenizer, data) and report no KL."""
    params = inspect.signature(task.evaluate).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {"reference": reference, "options": options}
    kwargs = {name: value for name, value in given.items() if name in params or open_ended}
    return task.evaluate(model, tokenizer, data, **kwargs)


def scores_completions(task: Task | None) -> bool:
    """Whether ``task`` implements ``score`` (the judged path), rather than only ``evaluate``."""
    return task is not None and type(task).score is not Task.score


class Evaluator:
    """Evaluates runs one after another, keeping what every run shares (the reference, the judge) loaded."""

    def __init__(self, spec: EvalSpec, fallback_seed: int = 0, plugins=None) -> None:
        from prefopt.registry.loading import default_plugins

        self.spec = spec
        self.fallback_seed = fallback_seed
        self.plugins = plugins or default_plugins()
        self._models: dict[tuple[str, str], object] = {}
        self._judge = None

    def shared_model(self, path: str, recipe, revision: str | None = None):
        """A model loaded once per process (the initial model and the reference)."""
        from prefopt.models.loading import load_causal_lm

        key = (path, recipe.model.dtype)
        if key not in self._models:
            self._models[key] = load_causal_lm(
                path, dtype=recipe.model.dtype, revision=revision, trust_remote_code=recipe.model.trust_remote_code
            ).eval()
        return self._models[key]

    def judge(self, device: str, seed: int):
        """The bench's judge (``eval.judge``), built once; None when the bench names none."""
        if self._judge is None and self.spec.judge is not None:
            from prefopt.api.judge import JudgeContext
            from prefopt.bench.recipe import judge_parts

            cls, config = judge_parts(self.spec.judge, self.plugins)
            self._judge = cls(config, JudgeContext(device=device, seed=seed))
        return self._judge

    def close(self) -> None:
        if self._judge is not None:
            self._judge.close()
            self._judge = None

    def evaluate(self, recipe_file: Path, *, initial: bool, baseline: Path | None = None) -> dict:
        import torch

        from prefopt.engine import build_task_data
        from prefopt.models.loading import load_tokenizer, resolve_model_path
        from prefopt.recipe import load_recipe

        started = time.perf_counter()
        text = recipe_file.read_text()
        recipe = load_recipe(recipe_file, plugins=self.plugins)
        m = recipe.model
        model_path = resolve_model_path(m.path)
        reference_path = resolve_model_path(recipe.reference.path) if recipe.reference.path else model_path
        result = {
            "recipe_sha256": recipe_digest(text), "options": options_record(self.spec, self.fallback_seed),
            "task": None, "judge": self.spec.judge.model_dump() if self.spec.judge is not None else None,
            "sampling": None, "metrics": {}, "reward": None, "kl": None, "length": None, "win_rate": None,
            "lc_win_rate": None, "eval_data_sha256": None, "scored_data_sha256": None,
            "policy": "initial model" if initial else str(Path(recipe.output.dir) / "model"),
            "reference": reference_path,
        }
        completions_file = recipe_file.parent / COMPLETIONS_FILE
        completions_file.unlink(missing_ok=True)  # whatever an earlier evaluation sampled is stale now
        if recipe.data.task is None and self.spec.judge is None:
            raise PrefoptError(f"{recipe_file}: nothing to evaluate with: the run has no data.task and the bench no "
                               "eval.judge")
        tokenizer = load_tokenizer(model_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
        initial_model = lambda: self.shared_model(model_path, recipe, m.revision)  # noqa: E731
        task = data = None
        if recipe.data.task is not None:
            # Built by the training child already (the same recipe): found in the task's cache.
            task, data = build_task_data(recipe, self.plugins, model_path, tokenizer, initial_model,
                                         show_progress=False)
            result.update(task=task.name, **_data_digests(data))
        policy = initial_model() if initial else load_trained(Path(recipe.output.dir) / "model", recipe)
        reference = initial_model() if reference_path == model_path else self.shared_model(reference_path, recipe)
        with torch.no_grad():
            if task is not None and self.spec.judge is None and not scores_completions(task):
                result.update(self._task_evaluate(task, policy, tokenizer, data, reference))
            else:
                lines, judged = self._judged(recipe, task, data, policy, tokenizer, reference, baseline)
                _write_lines(completions_file, lines)
                result.update(judged)
        del policy
        result["eval_s"] = round(time.perf_counter() - started, 2)
        write_json(recipe_file.parent / EVAL_FILE, result)
        return result

    def _task_evaluate(self, task: Task, policy, tokenizer, data, reference) -> dict:
        """A task that only evaluates (no ``score``): its own metrics, read under the keys it names."""
        metrics = call_evaluate(task, policy, tokenizer, data, reference, self.spec.options())
        metrics = {key: float(value) for key, value in metrics.items()}
        return {"metrics": metrics, "reward": metrics.get(task.reward_metric) if task.reward_metric else None,
                "kl": metrics.get(KL_METRIC), "length": metrics.get(task.length_metric) if task.length_metric else None}

    def _judged(self, recipe, task, data, policy, tokenizer, reference, baseline: Path | None) -> tuple[list, dict]:
        """The completions file's lines and the result's fields of the judged path."""
        from prefopt.api.judge import ScoreJudge
        from prefopt.judged.evaluate import judge_completions, judged_metrics, outcomes, win_rates
        from prefopt.judged.prompts import held_out_prompts

        held_out = held_out_prompts(recipe, tokenizer, task, data, self.spec.num_prompts)
        sampling = self.sampling(task, data)
        judge = self.judge(str(policy.device), sampling.seed)
        if judge is None:
            scorer = task.score
        elif isinstance(judge, ScoreJudge):
            scorer = judge.scores
        else:
            scorer = None  # a pairwise judge scores no completion alone: it compares them with the baseline's
        judged = judge_completions(policy, tokenizer, held_out.texts, scorer, reference, sampling,
                                   prompt_ids=held_out.ids)
        lines = [record.as_line() for record in judged.records]
        rates = {"win_rate": None, "lc_win_rate": None}
        if baseline is not None:
            baseline_lines = _read_lines(baseline)
            for line, outcome in zip(lines, outcomes(lines, baseline_lines, judge)):
                line["outcome"] = outcome
            rates = win_rates(lines, baseline_lines)
        fields = {"metrics": judged_metrics(judged), "reward": judged.mean_score, "kl": judged.kl,
                  "length": judged.mean_length, "sampling": dataclasses.asdict(sampling), **rates}
        if task is None:  # what the rewards were scored on: the prompts themselves (the data may be a hub's)
            fields["scored_data_sha256"] = recipe_digest(json.dumps(held_out.texts, sort_keys=True))
        return lines, fields

    def sampling(self, task: Task | None, data):
        """How completions are sampled: the task's settings where it has them, else the bench's; ``eval.seed``
        overrides either's seed."""
        from prefopt.judged.evaluate import JudgedOptions

        s = self.spec
        own = task.eval_sampling(data, s.options()) if task is not None else None
        if own is None:
            own = JudgedOptions(
                per_prompt=s.samples_per_prompt or 1, seed=self.fallback_seed, batch_size=s.batch_size,
                max_new_tokens=s.max_new_tokens or JudgedOptions.max_new_tokens, temperature=s.temperature,
                top_p=s.top_p, top_k=s.top_k,
            )
        return dataclasses.replace(own, seed=s.seed) if s.seed is not None else own


def _data_digests(data) -> dict:
    # Rewards compare only between runs scored on the same held-out prompts; the accuracy column also needs
    # the same held-out pairs.
    return {"eval_data_sha256": hashlib.sha256(Path(data.eval).read_bytes()).hexdigest(),
            "scored_data_sha256": hashlib.sha256(Path(data.scored_file).read_bytes()).hexdigest()}


def _read_lines(path: Path) -> list[dict]:
    """A completions file's lines; none when it does not exist (the initial model was evaluated without one)."""
    return read_completions(path) or []


def _write_lines(path: Path, lines: list[dict]) -> None:
    from prefopt.paths import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))


def load_trained(model_dir: Path, recipe):
    """A run's saved model; a LoRA adapter is merged into a fresh copy of the base model it names (the
    initial model, or for a staged algorithm the previous stage's model)."""
    from prefopt.models.loading import load_causal_lm, resolve_model_path

    m = recipe.model
    adapter_config = model_dir / "adapter_config.json"
    if not adapter_config.is_file():
        return load_causal_lm(str(model_dir), dtype=m.dtype, trust_remote_code=m.trust_remote_code).eval()
    from peft import PeftModel

    base_path = json.loads(adapter_config.read_text()).get("base_model_name_or_path") or resolve_model_path(m.path)
    base = load_causal_lm(base_path, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
    return PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload().eval()


def shown(result: dict) -> str:
    """The evaluation in a few words, for logs."""
    names = (("reward", "reward"), ("kl", "KL"), ("length", "length"), ("win_rate", "win rate"),
             ("lc_win_rate", "LC win rate"))
    return ", ".join(f"{name} {result[key]:.4g}" for key, name in names if result.get(key) is not None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prefopt.bench.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", type=Path, metavar="RECIPE", help="derived training recipes")
    parser.add_argument("--options", default="{}", help="the bench's eval section as JSON (options_record)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--initial", action="store_true", help="evaluate the initial model, not the saved one")
    which.add_argument("--baseline", type=Path, help="the initial model's completions file, for win rates")
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    evaluator = None
    try:
        evaluator = Evaluator(*parse_options(args.options))
        for recipe_file in args.recipes:
            result = evaluator.evaluate(recipe_file, initial=args.initial, baseline=args.baseline)
            print(f"{recipe_file.parent}: {shown(result) or 'no task metrics'} ({result['eval_s']:.0f} s)", flush=True)
    except PrefoptError as exc:
        print(f"prefopt: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        if evaluator is not None:
            evaluator.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
