"""The experiment trackers a run logs to: any tracker accelerate supports, by name, each with its own options.

``output.trackers`` is a list of names (``[tensorboard, wandb]``) or a mapping of names to their options
(``{wandb: {project: x, name: run1}, mlflow: {tracking_uri: file:///tmp/mlruns}}``); a recipe holds the
mapping form. A tracker's options go to its accelerate class, and through it to the library's own start
call (``wandb.init``, ``mlflow.start_run``, TensorBoard's ``SummaryWriter``, ...), except the one option
that names the project (``project`` for wandb, ``experiment_name`` for mlflow, see ``TRACKERS``), which
accelerate takes as its first argument; it defaults to ``prefopt``. Every tracker gets the full recipe,
flattened to dotted keys, as its hyperparameters, and every metric ``metrics.jsonl`` gets.

Names, options of the trackers whose options are known, and installed packages are checked when the recipe
is validated (``check_trackers``); a misspelt option of the others is reported by the library when the run
starts it, as one line naming the tracker. TensorBoard without options is the default, and a run goes on
without it, with a notice, where its package is not installed: ``metrics.jsonl`` holds every metric anyway.

Two trackers are prefopt's own subclasses of accelerate's. TensorBoard: accelerate's writes the
hyperparameters into a second folder that TensorBoard lists as a second, empty run; here they go into the
run's one folder, ``<output.dir>/tensorboard``, and a resumed run purges the steps it trains again, as
``metrics.jsonl`` is cut back. MLflow: accelerate's takes no tracking URI; here ``tracking_uri`` sets it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, on_main_process
from accelerate.tracking import MLflowTracker as _AccelerateMLflow
from accelerate.tracking import TensorBoardTracker as _AccelerateTensorBoard

from prefopt.errors import PrefoptError, did_you_mean

__all__ = [
    "PROJECT", "TENSORBOARD_DIR", "TRACKERS", "build_trackers", "check_trackers", "close_trackers", "log_table",
    "normalize_trackers", "start_trackers", "tracker_notices",
]

PROJECT = "prefopt"  # the project (or experiment) a tracker logs to unless its options name one
TENSORBOARD_DIR = "tensorboard"  # <output.dir>/tensorboard: the run's one TensorBoard folder


@dataclass(frozen=True)
class Tracker:
    """What prefopt knows of one of accelerate's trackers."""

    module: str | None  # what must be importable for it to run (None: not known, a tracker others registered)
    pip: str  # what to install when it is not
    project: str | None = None  # the option that is accelerate's first argument (the project), if any
    fixed: tuple[str, ...] = ()  # options the engine sets itself ...
    why_fixed: str = ""  # ... and why


TRACKERS: dict[str, Tracker] = {
    "tensorboard": Tracker("tensorboard", "tensorboard", fixed=("log_dir", "purge_step"),
                           why_fixed="its logs go to <output.dir>/tensorboard, purged on resume"),
    "wandb": Tracker("wandb", "wandb", project="project"),
    "mlflow": Tracker("mlflow", "mlflow", project="experiment_name"),
    "comet_ml": Tracker("comet_ml", "comet-ml", project="project_name"),
    "aim": Tracker("aim", "aim", fixed=("repo",), why_fixed="its repository is output.dir"),
    "clearml": Tracker("clearml", "clearml"),
    "dvclive": Tracker("dvclive", "dvclive"),
    "swanlab": Tracker("swanlab", "swanlab", project="project"),
    "trackio": Tracker("trackio", "trackio", project="project"),
}


# ----------------------------------------------------------------------------------------------------------
# the recipe's value, checked


def normalize_trackers(value: Any) -> Any:
    """The mapping form of ``output.trackers``: ``[tensorboard, {wandb: {...}}]`` and ``{wandb: null}`` become
    ``{tensorboard: {}, wandb: {...}}``, and a name alone (``output.trackers=wandb``) the one tracker. Anything
    else is returned as it is, for the schema to refuse."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        pairs = []
        for item in value:
            if isinstance(item, dict) and len(item) == 1:
                pairs.extend(item.items())
            elif isinstance(item, str):
                pairs.append((item, {}))
            else:
                raise ValueError(f"{item!r} is not a tracker name (or a one-key mapping of a name to its options)")
        names = [name for name, _ in pairs]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} named twice")
        value = dict(pairs)
    if isinstance(value, dict):
        return {name: {} if options is None else options for name, options in value.items()}
    return value


def known(name: str) -> Tracker:
    """What prefopt knows of tracker ``name``: nothing beyond its name for one a third party registered."""
    return TRACKERS.get(name) or Tracker(None, name)


def supported() -> list[str]:
    """Every tracker accelerate can start by name (those registered with it by third parties too)."""
    return sorted(LOGGER_TYPE_TO_CLASS)


def check_trackers(trackers: dict[str, dict[str, Any]]) -> None:
    """Raise ValueError naming what is wrong with ``output.trackers``: a tracker accelerate does not have, an
    option the engine sets or the tracker does not take, a package that is not installed."""
    for name, options in trackers.items():
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"unknown tracker {name!r}{did_you_mean(name, supported())}; accelerate supports "
                             f"{', '.join(supported())}")
        tracker = known(name)
        for option in options:
            if option in tracker.fixed:
                raise ValueError(f"option {option!r} of tracker {name!r} is set by prefopt ({tracker.why_fixed})")
        accepted = accepted_options(name)
        unknown = [option for option in options if accepted is not None and option not in accepted]
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} of tracker {name!r}{did_you_mean(unknown[0], accepted)}; "
                             f"{name} takes {', '.join(sorted(accepted))}")
        if not is_installed(name) and not is_optional(name, options):
            raise ValueError(f"tracker {name!r} needs the {tracker.pip} package, which is not installed: pip "
                             f"install {tracker.pip}")


def accepted_options(name: str) -> set[str] | None:
    """The options a tracker takes, where they are known without importing its library; None: any (they go to
    the library's own start call)."""
    if name == "tensorboard":
        return None  # SummaryWriter's keywords; importing TensorBoard to list them is not cheap
    tracker, cls = known(name), tracker_class(name)
    parameters = _parameters(cls)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    names = list(parameters)[1:]  # the first is the project, which the option ``tracker.project`` names
    if cls.requires_logging_directory:
        names.remove("logging_dir")  # the run directory
    return {*names, *([tracker.project] if tracker.project else [])} - set(tracker.fixed)


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The arguments of ``cls.__init__`` after ``self``; a subclass here adds its own to accelerate's class's,
    to which it passes the rest."""
    own = dict(list(inspect.signature(cls.__init__).parameters.items())[1:])
    if cls.__module__ != __name__:
        return own
    base = dict(list(inspect.signature(cls.__bases__[0].__init__).parameters.items())[1:])
    return {**base, **{k: p for k, p in own.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}}


def is_installed(name: str) -> bool:
    module = known(name).module
    return module is None or importlib.util.find_spec(module) is not None


def is_optional(name: str, options: dict[str, Any]) -> bool:
    """TensorBoard without options (the default) is left out, with a notice, where it is not installed: every
    metric is in metrics.jsonl anyway, and a base install should train its quickstart."""
    return name == "tensorboard" and not options


# ----------------------------------------------------------------------------------------------------------
# the run's trackers


def tracker_class(name: str) -> type[GeneralTracker]:
    return {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker}.get(name) or LOGGER_TYPE_TO_CLASS[name]


def build_trackers(trackers: dict[str, dict[str, Any]], run_dir: Path) -> list[GeneralTracker]:
    """The trackers of ``output.trackers``, built but not started (``start_trackers`` starts them), for
    ``Accelerator(log_with=...)``. An optional one that is not installed is left out (``tracker_notices``)."""
    built = []
    for name, options in trackers.items():
        if not is_installed(name) and is_optional(name, options):
            continue
        options, project_option = dict(options), known(name).project
        project = options.pop(project_option, PROJECT) if project_option else PROJECT
        cls = tracker_class(name)
        if cls.requires_logging_directory:
            built.append(cls(project, str(run_dir), **options))
        else:
            built.append(cls(project, **options))
    return built


def tracker_notices(trackers: dict[str, dict[str, Any]]) -> list[str]:
    """One line for each tracker ``build_trackers`` left out."""
    return [
        f"note: TensorBoard logs are off: the {TRACKERS[name].pip} package is not installed (pip install "
        f"{TRACKERS[name].pip}, or set output.trackers: [] to silence this); every metric is in metrics.jsonl"
        for name, options in trackers.items() if not is_installed(name) and is_optional(name, options)
    ]


# Trackers started in this process and not closed by the run's end: a run that stopped on an error leaves
# its trackers open, and the next run in the same process (a bench, tests) closes them before it starts
# its own, so it never logs into the run before it.
_OPEN: list[GeneralTracker] = []


def start_trackers(accelerator, config: dict[str, Any], start_step: int) -> None:
    """Start the accelerator's trackers (the main process's; the others log nothing) with ``config`` as their
    hyperparameters; ``start_step`` is where a resumed run continues. A tracker that fails to start is a
    one-line error naming it (a misspelt option, a login, the network), after the others are closed."""
    if not accelerator.is_main_process:
        return
    _close_open_quietly()
    for tracker in accelerator.log_with:
        if isinstance(tracker, TensorBoardTracker):
            tracker.resume_at(start_step)
        try:
            tracker.start()
            _OPEN.append(tracker)
            tracker.store_init_configuration(config)
        except Exception as exc:  # any library's failure: the fix is in the tracker's options or setup
            _close_open_quietly()
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise PrefoptError(
                f"output.trackers.{tracker.name}: the tracker did not start ({type(exc).__name__}: {message}); "
                f"check its options, login and network, or leave it out of output.trackers"
            ) from exc
        accelerator.trackers.append(tracker)


def close_trackers(accelerator) -> None:
    """Finish the accelerator's trackers (their last writes flushed, their runs marked finished) and forget
    them, so ending the accelerator does not finish them twice."""
    _close(list(accelerator.trackers))
    accelerator.trackers.clear()


def _close(trackers: list[GeneralTracker]) -> None:
    for tracker in trackers:
        if tracker in _OPEN:
            _OPEN.remove(tracker)
        tracker.finish()


def _close_open_quietly() -> None:
    """Finish every tracker still open: what a run that stopped on an error left, or the trackers started
    before one that failed to start. A failure there (a network gone since) neither keeps a run from starting
    nor hides the error that stopped it."""
    for tracker in list(_OPEN):
        with contextlib.suppress(Exception):  # that run is over; only its tracker's last state is lost
            _close([tracker])


# ----------------------------------------------------------------------------------------------------------
# tables (completions sampled while training), each tracker in its own way


def log_table(accelerator, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
    """Log a table (``rows`` of values under ``columns``) at ``step`` to every started tracker, in the way it
    supports: a tracker with accelerate's ``log_table`` (W&B, ClearML) as a table; TensorBoard as text (a
    markdown table); MLflow as a table artifact, ``<name>/step-<step>.json``, one per step. A tracker with
    none of these gets nothing; the caller's own file holds the rows anyway. Main process only."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if isinstance(tracker, _AccelerateTensorBoard):
            tracker.writer.add_text(name, markdown_table(columns, rows), global_step=step)
            tracker.writer.flush()
        elif isinstance(tracker, _AccelerateMLflow):
            _mlflow_table(tracker, name, columns, rows, step)
        elif callable(getattr(tracker, "log_table", None)):
            tracker.log_table(name, columns=columns, data=rows, step=step)


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """``rows`` as a markdown table, which TensorBoard's text dashboard renders. A cell's ``|`` is escaped and its
    line breaks become ``<br>``, so a completion stays in its cell."""

    def cell(value: Any) -> str:
        text = "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _mlflow_table(tracker: GeneralTracker, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
    import mlflow

    # One file per step: mlflow appends to an existing table artifact by downloading and rewriting it whole.
    data = {column: [row[i] for row in rows] for i, column in enumerate(columns)}
    mlflow.log_table(data, artifact_file=f"{name}/step-{step:07d}.json", run_id=tracker.active_run.info.run_id)


# ----------------------------------------------------------------------------------------------------------
# prefopt's two subclasses


class TensorBoardTracker(_AccelerateTensorBoard):
    """accelerate's TensorBoard tracker writing to one folder per run, ``<output.dir>/tensorboard``.

    accelerate's ``store_init_configuration`` calls ``SummaryWriter.add_hparams``, which writes the
    hyperparameters under a new ``<folder>/<time>`` (TensorBoard lists it as a second run, with no metrics),
    and an ``hparams.yml`` under yet another; here they are written into the run's own event file (the run
    directory already holds ``recipe.yaml``)."""

    def __init__(self, project: str, logging_dir: str, **options) -> None:
        super().__init__(TENSORBOARD_DIR, logging_dir, **options)  # the folder is the run's, not the project's

    def resume_at(self, step: int) -> None:
        """A run resumed at ``step`` logs steps after it again: TensorBoard hides what the interrupted run had
        logged from ``step + 1`` on (SummaryWriter's ``purge_step``), as ``metrics.jsonl`` is cut back."""
        if step:
            self.init_kwargs["purge_step"] = step + 1

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(values, metric_dict={}):  # the experiment, session start and end
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()


class MLflowTracker(_AccelerateMLflow):
    """accelerate's MLflow tracker with a ``tracking_uri`` option (``file:///...``, ``sqlite:///...``, a
    server); without it, MLflow's own (``MLFLOW_TRACKING_URI``, else its default). ``finish`` ends only
    the run this tracker started, never another active one (a parent run of the user's)."""

    def __init__(self, experiment_name: str, tracking_uri: str | None = None, **options) -> None:
        super().__init__(experiment_name, **options)
        self.tracking_uri = tracking_uri

    @on_main_process
    def start(self) -> None:
        import mlflow

        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        super().start()

    @on_main_process
    def finish(self) -> None:
        import mlflow

        active, ours = mlflow.active_run(), getattr(self, "active_run", None)
        if active is not None and ours is not None and active.info.run_id == ours.info.run_id:
            mlflow.end_run()
