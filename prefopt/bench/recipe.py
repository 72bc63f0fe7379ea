"""Bench recipes: which variants to compare, on which training recipe, over which seeds.

A bench recipe names a training recipe (``base``), overrides applied to every entry (the budget, say
``train.max_steps=16``), the seeds, the entries (a name and the overrides that make the variant) and
how runs are evaluated (``eval``): how many held-out prompts and completions, and the judge that scores
them (``eval.judge``, any judge plugin; without one, the task's own reward). Every entry x seed becomes an
ordinary training recipe::

    base + overrides + entry overrides + seed=<s> + output.dir=<output.dir>/runs/<entry>/seed-<s>

(and ``output.resume=auto``, so a crashed bench resumes; ``output.save_model=true``, for the evaluator;
``output.merge_lora=false``, so a LoRA run keeps its adapter, a few MB, rather than a merged copy of the
whole model: dozens of runs of a 135M model would otherwise fill tens of GB). All of them are validated
before anything trains, and every problem is reported at once, naming the entry; so is ``eval.judge`` (its
name and its options, against the judge's own Config) and what evaluating needs: a bench on data that is no
task judges the completions of held-out prompts, so it needs ``data.eval_split`` and ``eval.judge`` (with
neither, its rows hold training metrics only).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from prefopt.errors import PrefoptError, RecipeError
from prefopt.recipe import apply_override, format_problems, parse_override, read_yaml, validate_tree
from prefopt.api.algorithm import PluginSpec, plugin_config
from prefopt.api.judge import PairwiseJudge, ScoreJudge
from prefopt.api.task import EvalOptions

# Names become directory names: letters, digits, dot, dash, underscore; no leading dot or dash.
ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The untrained initial model is evaluated under this name, so no entry may take it.
INITIAL = "initial"
# Keys the bench sets on every run; overriding them would break resuming or evaluation.
BENCH_KEYS = {
    "seed": "list the seeds under seeds:",
    "output.dir": "set the bench's output.dir; each run goes to <output.dir>/runs/<entry>/seed-<s>",
    "output.resume": "the bench always resumes (output.resume=auto)",
    "output.save_model": "the evaluator loads the saved model",
    "output.merge_lora": "runs keep only their LoRA adapter, which the evaluator merges in memory",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_overrides(cls, overrides: list[str]) -> list[str]:
    """No item may set a key the bench owns (it would be overwritten without a word)."""
    for index, text in enumerate(overrides):
        dotted = ".".join(parse_override(text)[0])
        if dotted in BENCH_KEYS:
            reason = BENCH_KEYS[dotted]
            raise ValueError(f"item {index} ({text!r}) sets {dotted}, which the bench sets itself: {reason}")
    return overrides


def _override_list(cls, value: Any) -> Any:
    """Overrides must be strings; a YAML mapping here is almost always an unquoted 'key={a: b}'."""
    if isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise ValueError(
                    f"item {index} is a {type(item).__name__}, not a string dotted.key=value; quote it "
                    "(YAML reads 'loss={name: dpo}' unquoted as a mapping)"
                )
        for text in value:
            try:
                parse_override(text)
            except PrefoptError as exc:
                raise ValueError(str(exc)) from None
    return value


class EntrySpec(_Section):
    name: str = Field(..., description="The entry's name: a directory name, unique in the bench.")
    overrides: list[str] = Field([], description="Dotted-key overrides that make this variant, e.g. loss.beta=0.2.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not ENTRY_NAME.match(name):
            raise ValueError(
                f"{name!r} is not a safe directory name: use letters, digits, '.', '-' and '_' (up to 64), "
                "starting with a letter or digit"
            )
        if name == INITIAL:
            raise ValueError(f"{INITIAL!r} is reserved for the untrained initial model; choose another name")
        return name

    _overrides_are_strings = field_validator("overrides", mode="before")(_override_list)
    _overrides_leave_bench_keys = field_validator("overrides")(_check_overrides)


class EvalSpec(_Section):
    num_prompts: Optional[int] = Field(
        None, ge=1, description="The first N held-out prompts; none: all of them (the task's, or data.eval_split's)."
    )
    samples_per_prompt: Optional[int] = Field(
        None, ge=1, description="Completions sampled per prompt; none: the task's own setting, else 1."
    )
    max_new_tokens: Optional[int] = Field(
        None, ge=1, description="Length limit of each completion; none: the task's, else 24."
    )
    judge: Optional[PluginSpec] = Field(
        None, description="A judge plugin that scores (or compares, for a pairwise judge) each completion: {name: "
        "..., <its options>}; none: the task's own reward. Needed on data that is no task.",
    )
    seed: Optional[int] = Field(
        None, ge=0, description="Sampling seed, the same for every run; none: the task's eval seed, else the "
        "bench's first seed.",
    )
    temperature: float = Field(1.0, gt=0, le=5, description="Sampling temperature on data that is no task (a task "
                               "samples as it says); 1.0 samples the model as it is, as the KL estimate needs.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass on data that is no task; 1.0: off.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens, on data that is no task; 0: off.")
    batch_size: int = Field(64, ge=1, le=4096, description="Sequences per generate call on data that is no task; "
                            "with the seed, it fixes the random stream.")

    def options(self) -> EvalOptions:
        return EvalOptions(self.num_prompts, self.samples_per_prompt, self.max_new_tokens)

    def record(self) -> dict:
        """Everything that decides an evaluation's numbers, as JSON: what a current evaluation must match."""
        return self.model_dump(mode="json")


class OutputSpec(_Section):
    dir: str = Field(..., description="The bench's directory: runs, results.jsonl, leaderboard, plots.")


class PlotsSpec(_Section):
    curves: list[str] = Field(
        ["loss", "logps/chosen"], min_length=1, max_length=6,
        description="metrics.jsonl keys that curves.png plots against the step, one panel each (seed means); "
        "eval/* keys are the held-out pair metrics, logged every train.eval_every steps.",
    )


class BenchRecipe(_Section):
    base: str = Field(..., description="The training recipe every entry starts from, relative to the bench file.")
    overrides: list[str] = Field([], description="Dotted-key overrides applied to every entry (the budget).")
    seeds: list[int] = Field([0], min_length=1, description="Every entry is trained once per seed.")
    entries: list[EntrySpec] = Field(..., min_length=1, description="The variants, each a name and overrides.")
    eval: EvalSpec = Field(EvalSpec(), description="How runs are sampled and judged; the same for every run.")
    plots: PlotsSpec = Field(PlotsSpec(), description="What the figures show.")
    output: OutputSpec

    _overrides_are_strings = field_validator("overrides", mode="before")(_override_list)
    _overrides_leave_bench_keys = field_validator("overrides")(_check_overrides)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"seed {repeated[0]} is listed twice; each seed is one run per entry")
        if any(s < 0 for s in seeds):
            raise ValueError("seeds must be 0 or more")
        return seeds

    @field_validator("entries")
    @classmethod
    def _distinct_names(cls, entries: list[EntrySpec]) -> list[EntrySpec]:
        names = [e.name for e in entries]
        for index, name in enumerate(names):
            first = names.index(name)
            if first != index:
                raise ValueError(f"entries[{index}] is named {name!r} like entries[{first}]; names must be unique")
        return entries


# ----------------------------------------------------------------------------------------------------------
# the runs a bench holds


@dataclass(frozen=True)
class Run:
    """One entry x seed: its validated training recipe and its run directory (the recipe's output.dir)."""

    entry: str
    seed: int
    overrides: tuple[str, ...]  # the entry's own overrides
    recipe: Any
    dir: Path

    @property
    def label(self) -> str:
        return f"{self.entry} seed {self.seed}"


@dataclass(frozen=True)
class Bench:
    path: Path  # the bench recipe file
    spec: BenchRecipe
    base: Path  # the training recipe file
    dir: Path  # the bench's output directory
    runs: tuple[Run, ...]  # entry-major, in the recipe's order; empty when loaded without runs
    initial: Any  # the training recipe of the untrained initial model (base + overrides, first seed), or None

    @property
    def entry_names(self) -> list[str]:
        return [e.name for e in self.spec.entries]

    @property
    def initial_dir(self) -> Path:
        return self.dir / INITIAL

    @property
    def evaluation(self) -> EvalSpec:
        """``eval`` with the seed resolved: the bench's first seed on data that is no task (a task's evaluation
        keeps its own eval seed unless ``eval.seed`` sets one)."""
        e = self.spec.eval
        if e.seed is None and self.initial is not None and self.initial.data.task is None:
            return e.model_copy(update={"seed": self.spec.seeds[0]})
        return e

    @property
    def judged(self) -> bool:
        """Whether runs are evaluated (a task, or a judge); without either, rows hold training metrics only."""
        return self.initial is not None and (self.initial.data.task is not None or self.spec.eval.judge is not None)

    def run_dir(self, entry: str, seed: int) -> Path:
        return self.dir / "runs" / entry / f"seed-{seed}"


def load_bench(path: str | Path, plugins=None, *, with_runs: bool = True) -> Bench:
    """Read and validate a bench recipe; with ``with_runs``, also derive and validate the training recipe
    of every entry x seed. Raises RecipeError listing every problem."""
    path = Path(path)
    tree = read_yaml(path)
    try:
        spec = BenchRecipe.model_validate(tree)
    except ValidationError as exc:
        # keys as the user wrote them (entries[2].name), suggestions from the bench recipe's own sections
        raise RecipeError(str(path), format_problems(exc, model=BenchRecipe, root="(bench recipe)")) from None
    base = Path(os.path.normpath(path.parent / spec.base))  # recipes/dpo/x.yaml, not recipes/bench/../dpo/x.yaml
    if not base.is_file():
        raise RecipeError(str(path), [f"base: {base} not found (base is relative to the bench file's folder)"])
    bench = Bench(path=path, spec=spec, base=base, dir=Path(spec.output.dir), runs=(), initial=None)
    if not with_runs:
        return bench
    from prefopt.registry.loading import default_plugins

    return _with_runs(bench, plugins or default_plugins())


def derived_tree(base_tree: dict, overrides: list[str], seed: int, run_dir: Path) -> dict:
    """The training recipe tree of one run: the base, the overrides in order, then the keys the bench owns."""
    tree = copy.deepcopy(base_tree)
    for text in overrides:
        apply_override(tree, *parse_override(text))
    apply_override(tree, ["seed"], seed)
    # Set directly, not parsed: a path is a string whatever YAML would make of it.
    for keys, value in ((["output", "dir"], str(run_dir)), (["output", "resume"], "auto"),
                        (["output", "save_model"], True), (["output", "merge_lora"], False)):
        apply_override(tree, keys, value)
    return tree


def _with_runs(bench: Bench, plugins) -> Bench:
    spec = bench.spec
    base_tree = read_yaml(bench.base)
    problems: list[str] = []

    def validated(overrides: list[str], seed: int, run_dir: Path, source: str) -> tuple[Any, list[str]]:
        try:
            tree = derived_tree(base_tree, overrides, seed, run_dir)
            return validate_tree(tree, plugins, source), []
        except RecipeError as exc:
            return None, exc.problems
        except PrefoptError as exc:  # an override that walks into a value that is not a section
            return None, [str(exc)]

    # The base with the shared overrides, as the initial model is evaluated: a problem here is every entry's,
    # so it is reported once, not once per entry.
    initial, shared = validated(spec.overrides, spec.seeds[0], bench.dir / INITIAL, "base")
    problems += [f"{bench.base} with overrides: {p}" for p in shared]

    runs: list[Run] = []
    for index, entry in enumerate(spec.entries):
        seeds_by_problem: dict[str, list[int]] = {}
        for seed in spec.seeds:
            run_dir = bench.run_dir(entry.name, seed)
            recipe, found = validated([*spec.overrides, *entry.overrides], seed, run_dir, entry.name)
            for problem in found:
                if problem not in shared:
                    seeds_by_problem.setdefault(problem, []).append(seed)
            if recipe is not None:
                runs.append(Run(entry.name, seed, tuple(entry.overrides), recipe, run_dir))
        for problem, seeds in seeds_by_problem.items():
            which = "" if len(seeds) == len(spec.seeds) else f" (seed {', '.join(map(str, seeds))})"
            problems.append(f"entries[{index}] {entry.name!r}{which}: {problem}")
    if initial is not None:
        problems += evaluation_problems(spec.eval, initial, plugins)
    if problems:
        raise RecipeError(str(bench.path), problems)
    return Bench(bench.path, spec, bench.base, bench.dir, tuple(runs), initial)


def evaluation_problems(spec: EvalSpec, initial, plugins) -> list[str]:
    """What stops the runs' evaluation: a judge that is not installed, that takes other options or neither scores
    nor compares completions; data that is no task with a judge but no held-out prompts."""
    problems = []
    if spec.judge is not None:
        try:
            judge_parts(spec.judge, plugins)
        except PrefoptError as exc:
            problems.append(str(exc))
    if initial.data.task is None and spec.judge is not None and not initial.data.eval_split:
        problems.append("eval.judge judges completions of held-out prompts, and the base recipe (with the overrides) "
                        "holds none: set data.eval_split, or leave out eval.judge")
    return problems


def judge_parts(spec: PluginSpec, plugins) -> tuple[type, Any]:
    """The judge class ``eval.judge`` names and its validated Config; a one-line error naming ``eval.judge``."""
    try:
        cls = plugins.judges.get(spec.name)
    except PrefoptError as exc:  # the registry's message (did you mean), with the recipe key in front
        raise PrefoptError(f"eval.judge.name: {exc}") from None
    if not issubclass(cls, (ScoreJudge, PairwiseJudge)):
        raise PrefoptError(f"eval.judge: judge {spec.name!r} neither scores one completion nor compares two; name a "
                           "score judge or a pairwise judge (`prefopt list judge`)")
    return plugin_config(plugins.judges, spec, "eval.judge")
