"""Run a bench: train every entry x seed in its own process, evaluate it in another, then report.

For each entry, each seed's derived recipe is written to ``<run dir>/bench-recipe.yaml`` and trained by
``python -m prefopt.cli train`` in a fresh process, so the peak memory measured is that run's alone.
Then one evaluation process judges all of the entry's new runs (``prefopt.bench.evaluate``): it samples
completions of the held-out prompts (the task's, or the held-out rows' of ``data.eval_split``), scores them
with the bench's judge (``eval.judge``) or the task's reward, measures their KL to the reference, and
compares each with the initial model's completion of the same prompt and sample (win rates). What an
earlier invocation finished (``summary.json``, ``bench-train.json`` and a current ``bench-eval.json``: the
same recipe, the same judge and sampling settings) is skipped, and an interrupted training resumes from its
newest checkpoint, so rerunning the same command after a crash continues where it stopped. Before the first
entry, the untrained initial model is evaluated on the same held-out prompts with the same seeds: the origin
of the reward-vs-KL frontier, the baseline of the win rates, and a check of the evaluation settings before
hours of training. A bench with neither a task nor a judge evaluates nothing: its rows hold training
metrics only, and it says so once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from tqdm.auto import tqdm

from prefopt.data.load import looks_local
from prefopt.errors import PrefoptError, did_you_mean
from prefopt.paths import CACHE_ENV, cache_root
from prefopt.recipe import dump_recipe
from prefopt.recipe.flatten import flatten
from prefopt.bench.evaluate import options_record, recipe_digest, shown
from prefopt.bench.files import (
    COMPLETIONS_FILE, EVAL_FILE, EVAL_LOG, RECIPE_FILE, RESULTS_FILE, TRAIN_FILE, TRAIN_LOG, read_json, write_json,
)
from prefopt.bench.processes import failure_reason, last_error_line, python_module, run_child
from prefopt.bench.recipe import Bench, Run
from prefopt.bench.report import write_report
from prefopt.bench.results import run_row, write_results


@dataclass
class Outcome:
    rows: list[dict]  # every finished run of the bench, this invocation's and earlier ones'
    failures: list[str]  # one line per run that failed in this invocation
    report: dict[str, Path]


def run_bench(bench: Bench, *, only: list[str] | None = None, show_progress: bool = True) -> Outcome:
    runs = select_runs(bench, only)
    check_run_dirs(runs)
    check_local_models(bench, runs)
    bench.dir.mkdir(parents=True, exist_ok=True)
    say = tqdm.write
    entries = len({r.entry for r in runs})
    say(f"bench {bench.path}: {entries} entries x {len(bench.spec.seeds)} seeds = {len(runs)} runs in {bench.dir}")
    say(f"reference log-probs and task data are cached by content in {cache_root()} (${CACHE_ENV}): entries "
        "with the same reference, data and truncation share one reference cache, built by the first run")
    _warn_if_eval_follows_seed(bench, say)
    if not bench.judged:
        say("no data.task and no eval.judge: nothing samples or judges completions, so the rows hold training "
            "metrics only (no reward, KL, length or win rate); set eval.judge and data.eval_split to judge held-out "
            "completions")
    evaluate_initial(bench, say)

    failures: list[str] = []
    bar = tqdm(total=len(runs), desc="bench", unit="run", disable=not show_progress, dynamic_ncols=True)
    with bar:
        for entry, group in groupby(runs, key=lambda r: r.entry):
            to_evaluate = []
            for run in group:
                status = run_status(bench, run)
                if status == "finished":
                    say(f"{run.label}: skipped, finished by an earlier invocation")
                    bar.update(1)
                    continue
                if status == "untrained":
                    bar.set_postfix_str(f"{run.label}: training")
                    failure = train(run, say)
                    if failure:
                        failures.append(failure)
                        bar.update(1)
                        continue
                to_evaluate.append(run)
            if to_evaluate:
                bar.set_postfix_str(f"{entry}: evaluating")
                failures += evaluate_runs(bench, entry, to_evaluate, say)
                bar.update(len(to_evaluate))
        bar.set_postfix_str("")

    rows = collect_rows(bench)
    write_results(bench.dir / RESULTS_FILE, rows)
    return Outcome(rows, failures, write_report(bench, rows))


def select_runs(bench: Bench, only: list[str] | None) -> list[Run]:
    if not only:
        return list(bench.runs)
    for name in only:
        if name not in bench.entry_names:
            raise PrefoptError(f"--only {name}: no such entry in {bench.path}{did_you_mean(name, bench.entry_names)}; "
                               f"entries: {', '.join(bench.entry_names)}")
    return [run for run in bench.runs if run.entry in only]


def collect_rows(bench: Bench) -> list[dict]:
    rows = (run_row(run.entry, run.seed, list(run.overrides), run.dir) for run in bench.runs)
    return [row for row in rows if row is not None]


# ----------------------------------------------------------------------------------------------------------
# state of a run on disk


def run_status(bench: Bench, run: Run) -> str:
    """'finished', 'trained' (evaluation missing or stale) or 'untrained' (also: interrupted)."""
    if not ((run.dir / "summary.json").is_file() and (run.dir / TRAIN_FILE).is_file()):
        return "untrained"
    return "finished" if _evaluation_current(bench, run.dir, dump_recipe(run.recipe)) else "trained"


def _evaluation_current(bench: Bench, directory: Path, recipe_text: str) -> bool:
    """Whether ``bench-eval.json`` there evaluated this recipe with the bench's judge and sampling settings."""
    evaluated = read_json(directory / EVAL_FILE)
    return (evaluated is not None and evaluated.get("recipe_sha256") == recipe_digest(recipe_text)
            and evaluated.get("options") == _options(bench))


def _options(bench: Bench) -> dict:
    return options_record(bench.spec.eval, bench.spec.seeds[0])


def check_run_dirs(runs: list[Run]) -> None:
    """Refuse to continue a run directory that holds a run of another recipe (the bench recipe changed):
    resuming it would mix two recipes in one result. Every conflict is listed at once."""
    import yaml

    conflicts = []
    for run in runs:
        saved = run.dir / "recipe.yaml"  # written by the engine when the run started
        if not saved.is_file():
            continue
        before = flatten(yaml.safe_load(saved.read_text()) or {})
        now = flatten(yaml.safe_load(dump_recipe(run.recipe)))
        # Keys on one side only are defaults that a newer prefopt added or removed: not a change of recipe.
        changed = [key for key in now if key in before and before[key] != now[key]]
        if changed:
            key = changed[0]
            conflicts.append(f"{run.dir}: {key} is {before[key]!r} there, {now[key]!r} now"
                             + (f" (and {len(changed) - 1} more keys)" if len(changed) > 1 else ""))
    if conflicts:
        raise PrefoptError(
            f"{len(conflicts)} run directories hold runs of another recipe; delete them to train them anew, or set "
            "the bench's output.dir to a new folder\n" + "\n".join(conflicts)
        )


def check_local_models(bench: Bench, runs: list[Run]) -> None:
    """Refuse to start when a run names a local model directory that does not exist (a second reference
    that another command produces, say), rather than failing each such run after the others trained. A
    name that may be a hub id (owner/name) or an embedded model is left to the loader."""
    missing: dict[str, list[str]] = {}
    for run in runs:
        r = run.recipe
        named = [("model.path", r.model.path), ("reference.path", r.reference.path),
                 *(("reference.extra", path) for path in r.reference.extra)]
        for key, path in named:
            if path and looks_local(path) and not Path(path).expanduser().exists():
                entries = missing.setdefault(f"{key} {path}", [])
                if run.entry not in entries:
                    entries.append(run.entry)
    if missing:
        what, entries = next(iter(missing.items()))
        more = f" (and {len(missing) - 1} more missing paths)" if len(missing) > 1 else ""
        which = f"entr{'y' if len(entries) == 1 else 'ies'} {', '.join(entries)}"
        raise PrefoptError(f"{what} ({which}) does not exist{more}; create it first (see the "
                           f"header of {bench.path}) or leave the entry out with --only")


def _warn_if_eval_follows_seed(bench: Bench, say) -> None:
    task = bench.initial.data.task if bench.initial is not None else None
    if task is not None and len(bench.spec.seeds) > 1 and getattr(task, "eval_seed", 0) is None:
        say("warning: data.task.eval_seed is not set, so every seed holds out other prompts and rewards are "
            "compared on different prompts; add data.task.eval_seed=0 to the bench's overrides")


# ----------------------------------------------------------------------------------------------------------
# the child processes


def train(run: Run, say) -> str | None:
    """Train one run in a child process; returns a failure line, or None."""
    run.dir.mkdir(parents=True, exist_ok=True)
    recipe_file = run.dir / RECIPE_FILE
    recipe_file.write_text(dump_recipe(run.recipe))
    (run.dir / EVAL_FILE).unlink(missing_ok=True)  # whatever evaluated an earlier model is stale now
    resumed = (run.dir / "checkpoints").is_dir() and any((run.dir / "checkpoints").iterdir())
    log = run.dir / TRAIN_LOG
    say(f"{run.label}: training{' (resuming)' if resumed else ''}; log {log}")
    result = run_child(python_module("prefopt.cli", "train", str(recipe_file), "--no-progress"), log)
    if not result.ok or not (run.dir / "summary.json").is_file():
        line = f"{run.label}: training failed ({failure_reason(result, log)}); log {log}"
        say(line)
        return line
    write_json(run.dir / TRAIN_FILE, {
        "wall_s": round(result.wall_s, 2), "peak_rss_mib": round(result.peak_rss_mib, 1),
        # A resumed run's time and memory cover only the part after the crash.
        "resumed": resumed, "recipe_sha256": recipe_digest(recipe_file.read_text()),
    })
    steps = (read_json(run.dir / "summary.json") or {}).get("steps")
    say(f"{run.label}: trained {steps} steps in {result.wall_s:.0f} s, peak RSS {result.peak_rss_mib:.0f} MiB")
    return None


def evaluate_runs(bench: Bench, entry: str, runs: list[Run], say) -> list[str]:
    """Evaluate ``runs`` (one entry's) in one child process; returns failure lines."""
    for run in runs:
        text = dump_recipe(run.recipe)
        (run.dir / RECIPE_FILE).write_text(text)
        if not bench.judged:  # nothing samples or judges: the row holds training metrics only
            write_json(run.dir / EVAL_FILE, {
                "recipe_sha256": recipe_digest(text), "options": _options(bench), "task": None, "judge": None,
                "metrics": {}, "reward": None, "kl": None, "length": None, "win_rate": None, "lc_win_rate": None,
                "eval_s": 0.0,
            })
    log = bench.dir / "runs" / entry / EVAL_LOG
    reason = None
    if bench.judged:
        result = run_child(python_module("prefopt.bench.evaluate", "--options", json.dumps(_options(bench)),
                                         "--baseline", str(bench.initial_dir / COMPLETIONS_FILE),
                                         *[str(run.dir / RECIPE_FILE) for run in runs]), log)
        if not result.ok:
            reason = failure_reason(result, log)
    failures = []
    for run in runs:
        evaluated = read_json(run.dir / EVAL_FILE)
        if evaluated is None or not _evaluation_current(bench, run.dir, dump_recipe(run.recipe)):
            line = f"{run.label}: evaluation failed ({reason or last_error_line(log)}); log {log}"
            failures.append(line)
        else:
            line = f"{run.label}: evaluated: {_shown(evaluated)}"
        say(line)
    return failures


def evaluate_initial(bench: Bench, say) -> None:
    """Evaluate the untrained initial model once (again when the recipe or evaluation settings change): the
    baseline whose completions every entry's are compared with."""
    if not bench.judged:
        return
    directory = bench.initial_dir
    text = dump_recipe(bench.initial)
    if _evaluation_current(bench, directory, text):
        say(f"initial model: evaluated earlier: {_shown(read_json(directory / EVAL_FILE))}")
        return
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RECIPE_FILE).write_text(text)
    log = directory / EVAL_LOG
    say(f"initial model: evaluating (the task data is built first if it is not cached yet); log {log}")
    result = run_child(python_module("prefopt.bench.evaluate", "--initial", "--options", json.dumps(_options(bench)),
                                     str(directory / RECIPE_FILE)), log)
    if not result.ok or not _evaluation_current(bench, directory, text):
        raise PrefoptError(f"evaluating the initial model failed ({failure_reason(result, log)}); log {log}")
    say(f"initial model: {_shown(read_json(directory / EVAL_FILE))}")


def _shown(evaluated: dict) -> str:
    return shown(evaluated) or "no task metrics"
