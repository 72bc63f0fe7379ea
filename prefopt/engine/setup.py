"""``setup``: a run built from a recipe by a list of named builders, and a checkpoint restored when there is one.

Each builder does one thing and takes what the ones before it built; ``setup`` reads as their list. The
order matters: the loss comes first (it can fail on options, and the data takes the shape it declares),
the data before the model's weights (a bad file fails before a slow load), the extra references' caches
before the policy (so none of them is in memory beside it), and the seed is set before anything random.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from prefopt.api.algorithm import Phase
from prefopt.api.task import Task, TaskContext, TaskData
from prefopt.data.splits import load_split
from prefopt.data.types import TokenizedPairs
from prefopt.engine import checkpoint as ckpt
from prefopt.engine import optim
from prefopt.engine.early_stopping import EarlyStopping
from prefopt.engine.distributed import (
    accelerate_owns_state, check_distributed, configure_deepspeed, cpu_processes, sharded_params,
)
from prefopt.engine.markers import write_marker
from prefopt.engine.outputs import check_model_dir
from prefopt.engine.records import flat_config, truncate_metrics
from prefopt.engine.resuming import check_same_recipe, checkpoint_to_resume
from prefopt.engine.run import Run
from prefopt.engine.samples import build_completions
from prefopt.engine.trackers import build_trackers, start_trackers, tracker_notices
from prefopt.errors import PrefoptError
from prefopt.forward.layouts import describe_layout
from prefopt.locks import claim_run_dir
from prefopt.models.loading import load_causal_lm, load_sequence_scorer, load_tokenizer, resolve_model_path
from prefopt.models.peft import add_adapter
from prefopt.paths import cache_dir
from prefopt.publish.hub import token_from_env
from prefopt.recipe import build_loss, dump_recipe
from prefopt.recipe.schema import check_loss_needs
from prefopt.reference.setup import (
    References, assemble, build_extra_caches, build_primary, check_reference_recipe,
)
from prefopt.registry.loading import Plugins, default_plugins

log = logging.getLogger(__name__)


def setup(recipe, plugins: Plugins | None = None, *, phase: Phase | None = None, show_progress: bool = True,
          resume_from: str | Path | None = None) -> Run:
    """Everything a run needs, from a recipe, with a checkpoint restored when ``output.resume`` finds one (or
    ``resume_from``, a checkpoint folder, names one), if the recipe is the one that checkpoint trained under.

    ``phase`` is what an algorithm changes in this run (``prefopt.Phase``: which pairs, the model a task's
    data is built with, a reference the algorithm moves, prompt-only data, its own step plan, and hooks
    around each step); without one the run is one plain pass over the recipe's data. A recipe that still
    holds an ``algorithm`` section is refused: the algorithm runs through ``prefopt.engine.run``.
    """
    plugins, phase = plugins or default_plugins(), phase or Phase()
    refuse_algorithm_section(recipe)
    accelerator = build_accelerator(recipe)
    say = build_say(accelerator)
    show_progress = show_progress and accelerator.is_main_process
    claim_run_dir(Path(recipe.output.dir), say, main_process=accelerator.is_main_process)  # one writer at a time
    checkpoint = prepare_run_dir(recipe, plugins, accelerator, resume_from, say)
    loss = build_checked_loss(recipe, plugins, accelerator)
    models = ModelLoader(recipe, accelerator, scorer=loss.scores_sequences)
    data = build_data(recipe, plugins, phase, models, loss, accelerator, say, show_progress)
    extra_references = build_extra_references(recipe, models.tokenizer, data, accelerator, say, show_progress)
    policy = build_policy(recipe, models, accelerator)
    references = build_references(recipe, phase, loss, accelerator, policy, models.tokenizer, data,
                                  extra_references, say, show_progress)
    optimizer = build_optimizer(recipe, [p for p in policy.parameters() if p.requires_grad])
    say(describe_step(recipe, policy, loss, references))
    policy, optimizer, accumulation = prepare_for_training(recipe, accelerator, policy, optimizer)
    steps_per_epoch, total_steps = plan_epochs(recipe, data.train, phase, say)
    run = Run(
        recipe=recipe, accelerator=accelerator, run_dir=Path(recipe.output.dir), tokenizer=models.tokenizer,
        policy=policy, optimizer=optimizer, loss=loss, train_pairs=data.train, eval_pairs=data.eval,
        eval_sets=data.eval_sets, early_stopping=EarlyStopping.from_recipe(recipe),
        references=references, task=data.task, task_data=data.task_data, start_step=0, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, accumulation=accumulation,
        summary={"reference": references.info if references is not None else None, **eval_sets_summary(data)},
        train_rows=data.train_rows, phase=phase, completions=build_completions(recipe, plugins, accelerator),
    )
    extra = resume(run, checkpoint)
    start_records(run)
    start_phase(run, checkpoint, extra)
    return run


def refuse_algorithm_section(recipe) -> None:
    """A recipe with an algorithm runs through that algorithm, which sets up the engine itself."""
    if recipe.algorithm is not None:
        raise PrefoptError(
            f"this recipe runs algorithm {recipe.algorithm.name!r}: use prefopt.engine.run(recipe) or `prefopt "
            "train` to run it; an algorithm's own runs take a recipe derived without that section "
            "(prefopt.derive_recipe(recipe, plugins, {'algorithm': None}, source)), as engine.run would start "
            "the algorithm again"
        )


def build_accelerator(recipe):
    """A fresh accelerate state for this run (precision, trackers, CPU or not), seeded."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed

    # accelerate keeps one global state per process; runs in one process (benchmarks, tests) each set their
    # own precision, so start from a clean one. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        cpu=cpu_processes(),
        mixed_precision=recipe.train.mixed_precision,
        log_with=build_trackers(recipe.output.trackers, Path(recipe.output.dir)) or None,  # built, not started
        project_dir=str(Path(recipe.output.dir)),
    )
    check_distributed(recipe, accelerator)
    set_seed(recipe.seed)
    return accelerator


def build_say(accelerator) -> Callable[[str], None]:
    """Print a line on the main process only (above any progress bar)."""
    return tqdm.write if accelerator.is_main_process else (lambda message: None)


def prepare_run_dir(recipe, plugins: Plugins, accelerator, resume_from, say) -> Path | None:
    """The run directory, marked as prefopt's, with the recipe written into it; returns the checkpoint to resume
    from, if any. The recipe is compared with that checkpoint's before ``recipe.yaml`` is replaced, and a
    ``model/`` the run could not replace at its end is refused now rather than after training."""
    run_dir = Path(recipe.output.dir)
    checkpoint = checkpoint_to_resume(recipe, resume_from, say)
    if checkpoint is not None:
        check_same_recipe(recipe, checkpoint, plugins, say)
    if recipe.output.save_model:
        check_model_dir(run_dir / "model")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_marker(run_dir, "run")
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    return checkpoint


def build_checked_loss(recipe, plugins: Plugins, accelerator):
    """The recipe's loss plugin, with the reference settings it needs (or refuses) checked, and what a reward
    model rules out (checked at validation too; a recipe built in code may not have been)."""
    loss = build_loss(recipe, plugins)
    check_scorer_declarations(loss)
    check_loss_needs(recipe, loss)
    if loss.requires_reference:
        check_reference_recipe(recipe, loss, sharded_params(accelerator))
    elif recipe.reference.extra or recipe.reference.sync is not None:
        raise PrefoptError(f"loss {loss.name!r} uses no reference; remove reference.extra and reference.sync")
    return loss


def check_scorer_declarations(loss) -> None:
    """A reward model (``scores_sequences``) has one score per sequence and no reference: a loss that declares
    it and also asks for reference or per-token log-probs is a plugin mistake, named here."""
    if not loss.scores_sequences:
        return
    declared = ("requires_reference", "requires_token_logps", "requires_token_log_collision", "unpaired",
                "multi_reference")
    asks = [name for name in declared if getattr(loss, name)]
    if asks:
        raise PrefoptError(f"loss {loss.name!r} declares scores_sequences (a reward model: one score per sequence, "
                           f"no reference) and also {', '.join(asks)}, which a reward model cannot give; the loss "
                           "plugin must declare one or the other")


class ModelLoader:
    """The recipe's model: its resolved path and tokenizer now, its initial weights on the first ``get()``.

    Loading the weights late lets data errors surface before a slow load, and a task that builds its data
    with the initial model shares the one copy that then trains. The embedded default model is converted
    into the cache on first use, by the main process first. ``scorer``: the loss trains a reward model, so the
    weights load as a sequence scorer with one output (a fresh score head on a causal LM), padded as the
    tokenizer pads.
    """

    def __init__(self, recipe, accelerator, *, scorer: bool = False) -> None:
        self.config = recipe.model
        self.scorer = scorer
        self.device = accelerator.device  # quantized weights load straight onto it
        with accelerator.main_process_first():
            self.path = resolve_model_path(self.config.path)
        self.tokenizer = load_tokenizer(self.path, revision=self.config.revision,
                                        trust_remote_code=self.config.trust_remote_code)
        self._model: torch.nn.Module | None = None

    def get(self) -> torch.nn.Module:
        """The initial weights, loaded once; every call returns the same module."""
        if self._model is not None:
            return self._model
        m = self.config
        if self.scorer:  # the batches are padded with the tokenizer's pad id, so the scorer skips that id
            self._model = load_sequence_scorer(
                self.path, pad_token_id=self.tokenizer.pad_token_id, dtype=m.dtype, revision=m.revision,
                trust_remote_code=m.trust_remote_code, attn_implementation=m.attn_implementation,
            )
        else:
            self._model = load_causal_lm(
                self.path, dtype=m.dtype, revision=m.revision, trust_remote_code=m.trust_remote_code,
                attn_implementation=m.attn_implementation, quantization=m.quantization, device=self.device,
            )
        return self._model


@dataclass
class Data:
    """What ``build_data`` read: the training pairs and the rows they index, held-out pairs, the named eval
    sets, the task."""

    train: TokenizedPairs
    train_rows: Any  # the source rows the training pairs' ``row`` numbers index
    eval: TokenizedPairs | None
    task: Task | None
    task_data: TaskData | None
    eval_sets: dict[str, TokenizedPairs] = field(default_factory=dict)  # eval.sets, by name


def build_data(recipe, plugins: Plugins, phase: Phase, models: ModelLoader, loss, accelerator, say,
               show_progress: bool) -> Data:
    """The training and held-out pairs: from the files a task builds, or from the dataset the recipe names.
    The phase picks this run's training pairs (``select_train``) and may accept prompt-only data."""
    task, task_data = None, None
    if recipe.data.task is not None:
        data_model_path, load_data_model = task_data_model(recipe, models, phase.data_model)
        with accelerator.main_process_first():
            task, task_data = build_task_data(recipe, plugins, data_model_path, models.tokenizer, load_data_model,
                                              show_progress)
        train_source, eval_source = (str(task_data.train), "train"), (str(task_data.eval), "train")
    else:
        train_source = (recipe.data.path, recipe.data.train_split)
        eval_source = (recipe.data.path, recipe.data.eval_split) if recipe.data.eval_split else None
    selection = TrainSelection(phase.select_train)
    train = load_split(recipe, models.tokenizer, *train_source, recipe.data.max_train_pairs, loss, say, selection,
                       prompt_only="accept" if phase.pairs_from_prompts else "refuse")
    held_out = (
        load_split(recipe, models.tokenizer, *eval_source, recipe.data.max_eval_pairs, loss, say, prompt_only="drop")
        if eval_source else None
    )
    eval_sets = load_eval_sets(recipe, models.tokenizer, loss, say)
    return Data(train=train, train_rows=selection.rows, eval=held_out, task=task, task_data=task_data,
                eval_sets=eval_sets)


def load_eval_sets(recipe, tokenizer, loss, say) -> dict[str, TokenizedPairs]:
    """``eval.sets``, each read and tokenized as the held-out split is (the data section's lengths and rules,
    the set's own path, split, subset, columns and format); a prompt-only set holds no pairs and is left out,
    with a note. A problem with a set is one line naming its keys (``eval.sets.<name>.path``, ...)."""
    sets = {}
    for name, spec in recipe.eval.sets.items():
        d = recipe.data
        data = d.model_copy(update={"subset": spec.subset, "columns": spec.columns or d.columns,
                                    "format": spec.format or d.format})
        said = lambda line, name=name: say(in_eval_set(line, name))  # noqa: E731
        try:
            pairs = load_split(recipe.model_copy(update={"data": data}), tokenizer, spec.path, spec.split,
                               spec.max_pairs, loss, said, prompt_only="drop")
        except PrefoptError as exc:
            message = in_eval_set(str(exc), name)
            named = f"eval.sets.{name}." in message or message.startswith(f"eval.sets.{name}:")
            raise PrefoptError(message if named else f"eval.sets.{name}: {message}") from exc
        if pairs is not None:
            sets[name] = pairs
    return sets


# The data section's keys that an eval set has its own of, as load_split's messages name them, longest first
# (data.eval_split alone is in the note on prompt-only data: the set's path is what to change).
_SET_KEYS = {"data.train_split / data.eval_split": "split", "data.train_split": "split", "data.eval_split": "path",
             "data.columns": "columns", "data.format": "format", "data.subset": "subset", "data.path": "path"}
_SET_KEY = re.compile("|".join(re.escape(key) for key in _SET_KEYS))


def in_eval_set(message: str, name: str) -> str:
    """A message about data as it reads for eval set ``name``: its keys are eval.sets.<name>.*, not data.*."""
    message = _SET_KEY.sub(lambda m: f"eval.sets.{name}.{_SET_KEYS[m.group()]}", message)
    return f"eval.sets.{name}: {message.removeprefix('data: ')}" if message.startswith("data: ") else message


def eval_sets_summary(data: Data) -> dict:
    """``summary.json``'s ``eval_sets``: each set's pair count (nothing without sets)."""
    return {"eval_sets": {name: len(pairs) for name, pairs in data.eval_sets.items()}} if data.eval_sets else {}


class TrainSelection:
    """``load_split``'s ``select`` for the training split: keeps the source rows it is shown (the run hands
    them to an algorithm's phase) and applies the phase's ``select_train``, if any."""

    def __init__(self, select_train) -> None:
        self.select_train = select_train
        self.rows = None

    def __call__(self, pairs: TokenizedPairs, rows) -> TokenizedPairs:
        self.rows = rows
        return self.select_train(pairs, rows) if self.select_train is not None else pairs


def task_data_model(recipe, models: ModelLoader, data_model: str | None) -> tuple[str, Callable[[], Any]]:
    """The model a task builds its data with and how to load it: the policy's initial model (the one copy,
    shared with training) unless the phase names another, so every phase of an algorithm sees the same data.
    A reward model cannot generate, so a task samples its data from ``model.path`` loaded as the causal LM it
    is (the same data a policy trained from that model gets), a copy the task holds only while it builds."""
    if models.scorer and (data_model is None or resolve_model_path(data_model) == models.path):
        m = recipe.model
        return models.path, lambda: load_causal_lm(models.path, dtype=m.dtype, revision=m.revision,
                                                   trust_remote_code=m.trust_remote_code).eval()
    if data_model is None or resolve_model_path(data_model) == models.path:
        return models.path, lambda: models.get().eval()
    path, m = resolve_model_path(data_model), recipe.model
    return path, lambda: load_causal_lm(path, dtype=m.dtype, trust_remote_code=m.trust_remote_code).eval()


def build_task_data(recipe, plugins: Plugins, model_path: str, tokenizer, load_model, show_progress: bool):
    """The recipe's task and the files it built (or found in its cache)."""
    task_cls = plugins.tasks.get(recipe.data.task.name)
    task = task_cls(task_cls.Config.model_validate(recipe.data.task.model_dump(exclude={"name"})))
    ctx = TaskContext(
        model_id=model_path, tokenizer=tokenizer, load_model=load_model,
        cache_dir=cache_dir("tasks", task_cls.name), seed=recipe.seed, show_progress=show_progress,
    )
    return task, task.build(ctx)


def build_extra_references(recipe, tokenizer, data: Data, accelerator, say, show_progress: bool) -> tuple[list, list]:
    """Extra references (multi-reference losses), into the cache now, one model at a time, so none of them
    is in memory beside the policy. Returns the caches per reference and split, and their summaries."""
    if not recipe.reference.extra:
        return [], []
    splits = [data.train, data.eval, *data.eval_sets.values()]
    return build_extra_caches(recipe, tokenizer, splits, accelerator.device, show_progress, say,
                              accelerator.main_process_first)


def build_policy(recipe, models: ModelLoader, accelerator) -> torch.nn.Module:
    """The policy as it trains: the initial weights, the recipe's adapter if any (model.lora, model.peft or
    model.adapter, over base weights that may be quantized), on the run's device."""
    m = recipe.model
    # peft's SEQ_CLS adapter also trains a reward model's score head, whole (its modules_to_save)
    policy = add_adapter(models.get().train(), m, task_type="SEQ_CLS" if models.scorer else "CAUSAL_LM")
    if m.gradient_checkpointing:
        # transformers 5.24 renamed it activation_checkpointing_enable; the old name warns, and goes in v6
        if hasattr(policy, "activation_checkpointing_enable"):
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.quantization is not None:
        return policy  # quantized weights were loaded onto the device and cannot be moved
    return policy.to(accelerator.device)


def describe_step(recipe, policy, loss, references: References | None) -> str:
    """One line of how each training step computes, printed before the first: the layout ``train.layout``
    runs as on this model, precision, gradient checkpointing, the reference and the pairs per forward."""
    t = recipe.train
    layout = ("padded (a reward model scores each sequence)" if loss.scores_sequences
              else describe_layout(policy, t.layout, recipe.data.max_length))
    precision = "fp32" if t.mixed_precision == "no" else f"{t.mixed_precision} autocast"
    checkpointing = "on" if recipe.model.gradient_checkpointing else "off"
    reference = references.info.get("kind", "yes") if references is not None and references.info else "none"
    return (f"compute: layout {layout}; {precision}; gradient checkpointing {checkpointing}; reference {reference}; "
            f"{t.micro_batch_size} pairs per forward")


def build_references(recipe, phase: Phase, loss, accelerator, policy, tokenizer, data: Data,
                     extra_references: tuple[list, list], say, show_progress: bool) -> References | None:
    """The primary reference (cache, live model, or one that follows the policy) with any extra ones; None for
    a loss that needs no reference."""
    if not loss.requires_reference:
        return None
    primary_train, primary_eval, following, info, primary_sets = build_primary(
        recipe, accelerator, policy, tokenizer, data.train, data.eval, show_progress, say,
        following=phase.reference_follows_policy, eval_sets=data.eval_sets,
    )
    extra_caches, extra_info = extra_references
    return assemble(primary_train, primary_eval, following, extra_caches, info, extra_info, primary_sets)


def build_optimizer(recipe, params) -> torch.optim.Optimizer:
    """The optimizer over ``params``, the policy's trainable parameters."""
    return optim.build_optimizer(recipe, list(params))


def prepare_for_training(recipe, accelerator, policy, optimizer):
    """Policy and optimizer wrapped for the launch (DDP, FSDP, DeepSpeed), and the micro-batches per process
    that make one step's ``train.batch_size``."""
    t, world = recipe.train, accelerator.num_processes
    if t.batch_size % (t.micro_batch_size * world):
        raise PrefoptError(
            f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size "
            f"({t.micro_batch_size}) x processes ({world})"
        )
    accumulation = t.batch_size // (t.micro_batch_size * world)
    configure_deepspeed(accelerator, t, accumulation)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    return policy, optimizer, accumulation


def plan_epochs(recipe, train_pairs: TokenizedPairs, phase: Phase, say) -> tuple[int, int]:
    """Steps per epoch (full batches only) and the steps of ``train.epochs`` (capped by ``train.max_steps``)."""
    t = recipe.train
    if len(train_pairs) < t.batch_size:
        raise PrefoptError(
            f"{train_pairs.source}: {train_pairs.describe()} usable, fewer than train.batch_size ({t.batch_size})"
        )
    steps_per_epoch = len(train_pairs) // t.batch_size
    left_out = len(train_pairs) - steps_per_epoch * t.batch_size
    # A phase that plans its own steps never trains this schedule, so it is not described.
    if left_out and not phase.plans_own_steps:
        unit = "prompts" if train_pairs.prompt_only else "pairs"
        say(f"each epoch uses {steps_per_epoch * t.batch_size} of {len(train_pairs)} {unit} in full batches of "
            f"{t.batch_size}; which {left_out} sit out changes every epoch")
    total_steps = steps_per_epoch * t.epochs
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    return steps_per_epoch, total_steps


def resume(run: Run, checkpoint: Path | None) -> dict:
    """Policy, optimizer, loss state and a following reference as ``checkpoint`` left them; returns the
    checkpoint's ``extra`` (an algorithm's state), empty for a fresh run."""
    if checkpoint is None:
        return {}
    if accelerate_owns_state(run.accelerator):
        state = ckpt.load_accelerate_checkpoint(checkpoint, run.accelerator)
    else:
        state = ckpt.load_checkpoint(checkpoint, run.accelerator.unwrap_model(run.policy), run.optimizer)
    run.loss.load_state_dict(state.loss_state)
    run.skipped_steps = state.counters.get("skipped_steps", 0)
    run.nonfinite_in_a_row = state.counters.get("nonfinite_in_a_row", 0)
    run.num_tokens = state.counters.get("num_tokens", 0)
    if run.early_stopping is not None:
        run.early_stopping.load_state_dict(state.counters.get("early_stopping"), run.say)
    if run.reference is not None and run.reference.following is not None:
        run.reference.following.weights.load_state_dict(ckpt.load_tensors(checkpoint, "reference"))
    run.start_step = state.step
    of_total = "" if run.phase.plans_own_steps else f" of {run.total_steps}"
    run.say(f"resuming from {checkpoint} (step {run.start_step}{of_total})")
    return state.extra


def start_records(run: Run) -> None:
    """metrics.jsonl cut back to where the run continues, and the trackers started (a push's token checked
    now, not after training)."""
    if run.is_main:
        truncate_metrics(run.run_dir / "metrics.jsonl", run.start_step)
    for notice in tracker_notices(run.recipe.output.trackers):
        run.say(notice)
    start_trackers(run.accelerator, flat_config(run.recipe), run.start_step)
    push = run.recipe.output.push_to_hub
    if push is not None:
        token_from_env(push.token_env, "output.push_to_hub.token_env")


def start_phase(run: Run, checkpoint: Path | None, extra: dict) -> None:
    """The phase's ``start``, its state restored from ``checkpoint``, and its step plan if it makes one."""
    phase, ctx = run.phase, run.context
    phase.start(ctx)
    if checkpoint is not None:
        phase.restore(extra, functools.partial(ckpt.load_tensors, checkpoint))
    if phase.plans_own_steps:
        planned, cap = phase.total_steps(ctx), run.recipe.train.max_steps
        run.total_steps = min(planned, cap) if cap is not None else planned
        run.steps_per_epoch = phase.steps_per_epoch(ctx) or run.steps_per_epoch
