"""The training loop: setup() -> fit() -> finish(), on accelerate.

Read it top to bottom. ``setup`` builds everything a run needs from a recipe (model, data, loss,
reference, optimizer) and restores a checkpoint when there is one; ``fit`` runs the optimizer steps;
``finish`` evaluates and saves the model. The engine never looks at a loss's name: it asks what the
loss declares it needs.

Batching and reduction: an optimizer step takes ``train.batch_size`` pairs (unpaired examples, for a
loss that declares ``unpaired``), split over processes and then into micro-batches of
``train.micro_batch_size``. Each micro-batch's per-pair losses are summed and divided by the step's
pair count, so the gradient is the mean over the step whatever the accumulation or the number of
processes. The order of pairs is a function of the seed and the epoch, so resuming at step N replays
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .batching import PreferenceBatch, collate_pairs
from .data import for_loss, load_rows, to_examples, tokenize_examples
from .data.types import TokenizedPairs
from .errors import PrefoptError
from .layouts import row_length
from .logprobs import SequenceLogps, sequence_logps
from .loss import PairLogps, PreferenceLoss
from .metrics import PairMetrics
from .model import add_lora, is_peft, load_causal_lm, load_tokenizer, resolve_model_path
from .paths import cache_dir
from .plugins import Plugins, default_plugins
from .recipe import build_algorithm, build_loss, dump_recipe
from .reference_setup import References, assemble, build_extra_caches, build_primary, check_reference_recipe, sync_due
from .task import Task, TaskContext, TaskData

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything ``fit`` and ``finish`` need, built by ``setup``."""

    recipe: Any
    accelerator: Any
    run_dir: Path
    tokenizer: Any
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: PreferenceLoss
    train_pairs: TokenizedPairs
    eval_pairs: TokenizedPairs | None
    references: References | None  # None when the loss needs no reference
    task: Task | None
    task_data: TaskData | None
    start_step: int
    total_steps: int
    steps_per_epoch: int
    accumulation: int
    summary: dict = field(default_factory=dict)
    resumed_from: Path | None = None  # the checkpoint this run continues, if any
    resumed_extra: dict = field(default_factory=dict)  # that checkpoint's ``extra`` (an algorithm's state)
    # Seams for algorithm plugins that change the data while training (online variants), all optional:
    # which pairs optimizer step ``step`` takes (default: a seeded permutation of train_pairs per epoch) ...
    pairs_of_step: Callable[[int], list[int]] | None = None
    # ... work before each step (sampling a round) returning metrics to record at that step, work after it
    # (an EMA update), and the state an algorithm adds to each checkpoint: (json-able extra, tensor sets).
    before_step: Callable[["Run", int], dict[str, float]] | None = None
    after_step: Callable[["Run", int], None] | None = None
    checkpoint_state: Callable[[], tuple[dict, dict[str, dict[str, torch.Tensor]]]] | None = None

    @property
    def reference(self):
        """The training references (batch -> one SequenceLogps per reference), or None."""
        return self.references.train if self.references is not None else None

    @property
    def eval_reference(self):
        return self.references.eval if self.references is not None else None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)


# ----------------------------------------------------------------------------------------------------------
# setup


def setup(recipe, plugins: Plugins | None = None, *, show_progress: bool = True,
          select_train: Callable[[TokenizedPairs, Any], TokenizedPairs] | None = None,
          data_model: str | None = None, reference_follows_policy: bool = False,
          plans_own_steps: bool = False, pairs_from_prompts: bool = False) -> Run:
    """Everything a run needs, from a recipe. For algorithm plugins, which run the engine in phases:
    ``select_train(pairs, rows)`` picks the training pairs of this phase (``rows`` are the source rows the
    pairs' ``row`` numbers index), ``data_model`` is the model a task builds its data with (default: the
    policy's initial model), so every phase trains on the same data, and ``reference_follows_policy`` gives
    a loss that needs a reference one that the algorithm syncs from the policy itself
    (``run.reference.following.sync``), as iterative DPO does between rounds, and ``plans_own_steps`` says
    that the algorithm sets ``run.total_steps`` and the pairs of each step itself (so the data's epoch
    arithmetic is not printed: it would describe a schedule that does not run), and ``pairs_from_prompts``
    says that the algorithm reads only the training data's prompts and makes every pair it trains on itself
    (samples and judges responses), so prompt-only training data (``data.format: prompt_only``) is accepted:
    ``run.train_pairs`` then holds prompts with empty responses, which the algorithm must replace before the
    first step, with a live or following reference (a reference cache is built from the data's responses;
    ``collate_pairs`` refuses response-less pairs wherever they would be scored). Without it prompt-only training data is refused. Prompt-only held-out data has no pairs to
    score: it is dropped with a note, and only a task's metrics are evaluated."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed

    plugins = plugins or default_plugins()
    if recipe.algorithm is not None:
        raise PrefoptError(f"this recipe runs algorithm {recipe.algorithm.name!r}: use prefopt.engine.run (or "
                           "`prefopt train`), which drives the engine through it")
    run_dir = Path(recipe.output.dir)
    # accelerate keeps one global state per process; runs in one process (benchmarks, tests) each set their
    # own precision, so start from a clean one. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        cpu=_cpu_processes(),
        mixed_precision=recipe.train.mixed_precision,
        log_with=list(recipe.output.trackers) or None,
        project_dir=str(run_dir),
    )
    _check_distributed(recipe, accelerator)
    set_seed(recipe.seed)
    say = (lambda m: tqdm.write(m)) if accelerator.is_main_process else (lambda m: None)
    show_progress = show_progress and accelerator.is_main_process

    resume_from = ckpt.latest_checkpoint(run_dir) if recipe.output.resume == "auto" else None
    if recipe.output.resume == "never" and ckpt.checkpoints(run_dir):
        raise PrefoptError(
            f"output.dir {run_dir} already holds checkpoints; set output.resume=auto to continue that run "
            "or choose another output.dir"
        )
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))

    # The loss comes first: its construction can fail on options, and the data takes the shape it declares
    # (pairs, or unpaired examples).
    loss = build_loss(recipe, plugins)
    if loss.requires_reference:
        check_reference_recipe(recipe, loss, _sharded_params(accelerator))
    elif recipe.reference.extra or recipe.reference.sync is not None:
        raise PrefoptError(f"loss {loss.name!r} uses no reference; remove reference.extra and reference.sync")

    # Model and tokenizer. The embedded default is converted once into the cache on first use.
    with accelerator.main_process_first():
        model_path = resolve_model_path(recipe.model.path)
    m = recipe.model
    tokenizer = load_tokenizer(model_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    loaded: list[torch.nn.Module] = []

    def initial_policy() -> torch.nn.Module:
        """The policy's initial weights, loaded on first use: data errors surface before a slow load."""
        if not loaded:
            model = load_causal_lm(
                model_path, dtype=m.dtype, revision=m.revision, trust_remote_code=m.trust_remote_code,
                attn_implementation=m.attn_implementation,
            )
            loaded.append(model)
        return loaded[0]

    # Data: a task builds preference files; otherwise the recipe names a dataset.
    task, task_data = None, None
    if recipe.data.task is not None:
        data_model_path, load_data_model = model_path, lambda: initial_policy().eval()
        if data_model is not None and resolve_model_path(data_model) != model_path:
            data_model_path = resolve_model_path(data_model)
            load_data_model = lambda: load_causal_lm(  # noqa: E731
                data_model_path, dtype=m.dtype, trust_remote_code=m.trust_remote_code).eval()
        with accelerator.main_process_first():
            task, task_data = build_task_data(recipe, plugins, data_model_path, tokenizer, load_data_model,
                                              show_progress)
        train_source, eval_source = (str(task_data.train), "train"), (str(task_data.eval), "train")
    else:
        train_source = (recipe.data.path, recipe.data.train_split)
        eval_source = (recipe.data.path, recipe.data.eval_split) if recipe.data.eval_split else None
    train_pairs = _tokenized(recipe, tokenizer, *train_source, recipe.data.max_train_pairs, loss, say, select_train,
                             prompt_only="accept" if pairs_from_prompts else "refuse")
    eval_pairs = (
        _tokenized(recipe, tokenizer, *eval_source, recipe.data.max_eval_pairs, loss, say, prompt_only="drop")
        if eval_source else None
    )

    # Extra references (multi-reference losses) go into the cache now, one model at a time, so none of them
    # is in memory beside the policy.
    extra_caches, extra_info = [], []
    if recipe.reference.extra:
        extra_caches, extra_info = build_extra_caches(
            recipe, tokenizer, [train_pairs, eval_pairs], accelerator.device, show_progress, say,
            accelerator.main_process_first,
        )

    policy = initial_policy().train()
    if m.lora is not None:
        policy = add_lora(policy, m.lora)
    if m.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.to(accelerator.device)

    references = None
    summary: dict[str, Any] = {"reference": None}
    if loss.requires_reference:
        primary_train, primary_eval, following, info = build_primary(
            recipe, accelerator, policy, tokenizer, train_pairs, eval_pairs, show_progress, say,
            following=reference_follows_policy,
        )
        references = assemble(primary_train, primary_eval, following, extra_caches, info, extra_info)
        summary["reference"] = references.info

    trainable = [p for p in policy.parameters() if p.requires_grad]
    t = recipe.train
    optimizer = torch.optim.AdamW(
        trainable, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay
    )
    world = accelerator.num_processes
    if t.batch_size % (t.micro_batch_size * world):
        raise PrefoptError(
            f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size "
            f"({t.micro_batch_size}) x processes ({world})"
        )
    _configure_deepspeed(accelerator, t, t.batch_size // (t.micro_batch_size * world))
    policy, optimizer = accelerator.prepare(policy, optimizer)

    if len(train_pairs) < t.batch_size:
        raise PrefoptError(
            f"{train_pairs.source}: {train_pairs.describe()} usable, fewer than train.batch_size ({t.batch_size})"
        )
    steps_per_epoch = len(train_pairs) // t.batch_size
    left_out = len(train_pairs) - steps_per_epoch * t.batch_size
    if left_out and not plans_own_steps:
        unit = "prompts" if train_pairs.prompt_only else "pairs"
        say(f"each epoch uses {steps_per_epoch * t.batch_size} of {len(train_pairs)} {unit} in full batches of "
            f"{t.batch_size}; which {left_out} sit out changes every epoch")
    total_steps = steps_per_epoch * t.epochs
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)

    start_step, resumed_extra = 0, {}
    if resume_from is not None:
        if _engine_state(accelerator):
            state = ckpt.load_accelerate_checkpoint(resume_from, accelerator)
        else:
            state = ckpt.load_checkpoint(resume_from, accelerator.unwrap_model(policy), optimizer)
        loss.load_state_dict(state.loss_state)
        if references is not None and references.train.following is not None:
            references.train.following.weights.load_state_dict(ckpt.load_tensors(resume_from, "reference"))
        start_step, resumed_extra = state.step, state.extra
        of_total = "" if plans_own_steps else f" of {total_steps}"
        say(f"resuming from {resume_from} (step {start_step}{of_total})")
    if accelerator.is_main_process:
        _truncate_metrics(run_dir / "metrics.jsonl", start_step)

    if recipe.output.trackers:
        accelerator.init_trackers("prefopt", config=_flat_config(recipe))

    return Run(
        recipe=recipe, accelerator=accelerator, run_dir=run_dir, tokenizer=tokenizer, policy=policy,
        optimizer=optimizer, loss=loss, train_pairs=train_pairs, eval_pairs=eval_pairs, references=references,
        task=task, task_data=task_data, start_step=start_step,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        accumulation=t.batch_size // (t.micro_batch_size * world), summary=summary,
        resumed_from=resume_from, resumed_extra=resumed_extra,
    )


def _cpu_processes() -> bool:
    """Whether this is one of several processes started by a launcher on a machine with no GPU (or FSDP or
    DeepSpeed asked for where they cannot run: a one-line error instead of accelerate's traceback).

    ``accelerate launch --multi_gpu`` (torchrun) starts the processes, but accelerate joins them over gloo
    only when told they are CPU processes; otherwise each would train alone, all into one output.dir.
    """
    import accelerate

    no_device = not torch.accelerator.is_available()
    if _env_flag("ACCELERATE_USE_FSDP") and no_device:
        raise PrefoptError(
            f"FSDP needs GPUs: accelerate {accelerate.__version__} runs FSDP only on CUDA, XPU, NPU, MLU, MUSA or "
            "HPU devices and this machine has none; on CPU launch with "
            "--config_file recipes/accelerate/ddp_cpu.yaml (DDP over gloo) instead"
        )
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and importlib.util.find_spec("deepspeed") is None:
        raise PrefoptError(
            "this run was launched for DeepSpeed but the package 'deepspeed' is not installed: "
            "pip install deepspeed, or launch with another config in recipes/accelerate/"
        )
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and no_device


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _check_distributed(recipe, accelerator) -> None:
    """Refuse what would silently train wrong, before any model is loaded."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise PrefoptError(
            f"launched as {launched} processes but accelerate joined {accelerator.num_processes}: each would train "
            "alone; launch with a config from recipes/accelerate/ (on CPU: ddp_cpu.yaml)"
        )
    if not _sharded_params(accelerator):
        return
    if recipe.data.task is not None and recipe.eval.task_metrics:
        raise PrefoptError(
            "eval.task_metrics samples from the model on the main process alone, which FSDP or ZeRO-3 cannot do "
            "(each process holds a shard of the weights); set eval.task_metrics=false"
        )
    if recipe.model.lora is not None and recipe.output.save_model and recipe.output.merge_lora:
        raise PrefoptError(
            "output.merge_lora needs the whole model on one process, which FSDP or ZeRO-3 do not hold; "
            "set output.merge_lora=false (the adapter is saved) or train without sharding"
        )


def _sharded_params(accelerator) -> bool:
    """Whether each process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


def _engine_state(accelerator) -> bool:
    """Whether model and optimizer state live in FSDP or DeepSpeed, so checkpoints go through accelerate."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _configure_deepspeed(accelerator, train, accumulation: int) -> None:
    """Fill the DeepSpeed config from the recipe (prefopt prepares no dataloader for accelerate to read).

    DeepSpeed steps its optimizer inside ``backward`` and clips there too, so the engine's own accumulation
    and clipping cannot apply: one micro-batch per process per step, and ``gradient_clipping`` from the recipe.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if accumulation != 1:
        raise PrefoptError(
            f"under DeepSpeed each optimizer step must be one micro-batch per process: set train.micro_batch_size "
            f"to train.batch_size / processes ({train.batch_size // accelerator.num_processes})"
        )
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    clip = train.max_grad_norm if train.max_grad_norm is not None else 0.0  # 0: DeepSpeed does not clip
    if config.get("gradient_clipping", "auto") not in ("auto", clip):
        raise PrefoptError(
            f"the DeepSpeed config clips gradients at {config['gradient_clipping']} but train.max_grad_norm is "
            f"{train.max_grad_norm}; set gradient_clipping: auto in the accelerate config"
        )
    if config.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise PrefoptError("set gradient_accumulation_steps: 1 in the accelerate config: prefopt batches steps itself")
    config.update(train_micro_batch_size_per_gpu=train.micro_batch_size, gradient_accumulation_steps=1,
                  gradient_clipping=clip)


def build_task_data(recipe, plugins: Plugins, model_path: str, tokenizer, load_model, show_progress: bool):
    """The recipe's task and the files it built (or found in its cache)."""
    task_cls = plugins.tasks.get(recipe.data.task.name)
    task = task_cls(task_cls.Config.model_validate(recipe.data.task.model_dump(exclude={"name"})))
    ctx = TaskContext(
        model_id=model_path, tokenizer=tokenizer, load_model=load_model,
        cache_dir=cache_dir("tasks", task_cls.name), seed=recipe.seed, show_progress=show_progress,
    )
    return task, task.build(ctx)


def _tokenized(recipe, tokenizer, path: str, split: str, limit: int | None, loss: PreferenceLoss, say,
               select=None, *, prompt_only: Literal["refuse", "accept", "drop"] = "refuse") -> TokenizedPairs | None:
    """One split, tokenized for ``loss``. ``prompt_only`` says what prompt-only rows become: ``refuse`` (a
    run that trains on the data's responses), ``accept`` (an algorithm that makes its own pairs) or ``drop``
    (held-out data: no pairs to score, so None)."""
    d = recipe.data
    rows = load_rows(path, split, d.subset, recipe.model.trust_remote_code)
    source = f"{path} (split {split})"
    examples, skipped, first = to_examples(rows, d.columns.model_dump(), d.format, source)
    if limit is not None:
        examples = examples[:limit]  # counts rows: a pair split for an unpaired loss gives two examples
    # checked before tokenizing, so that an unusable row does not hide that the whole split cannot be used
    if d.format == "prompt_only" or any(example.prompt_only for example in examples):
        if prompt_only == "refuse":
            raise _prompt_only_refused(source, d, rows.column_names)
        if prompt_only == "drop":
            say(f"data: {source}: prompt-only rows hold no pairs, so no held-out pair metrics (eval/loss, "
                f"eval/rewards/*) are computed; set data.eval_split to preference data for them")
            return None
    else:
        examples = for_loss(examples, unpaired=loss.unpaired, loss_name=loss.name, fmt=d.format, source=source)
    pairs = tokenize_examples(
        examples, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
        append_eos=d.append_eos, invalid_rows=d.invalid_rows, source=source, skipped=skipped,
        first_skipped_row=first,
    )
    note = ""
    if pairs.skipped:
        reasons = "; ".join(f"{n} {reason} (first: row {pairs.first_skipped_row[reason]})"
                            for reason, n in pairs.skipped.items())
        note = f", left out {sum(pairs.skipped.values())}: {reasons}"
    say(f"data: {source}: {pairs.describe()}{note}")
    if select is not None:
        pairs = select(pairs, rows)
    return pairs


def _prompt_only_refused(source: str, data, columns: list[str]) -> PrefoptError:
    # under auto, responses in columns the recipe does not name look like prompt-only data: say which columns
    # were looked for and which there are
    looked_for = ", ".join(repr(getattr(data.columns, key)) for key in ("chosen", "rejected", "completion"))
    found = "data.format=prompt_only" if data.format == "prompt_only" else (
        f"data.format={data.format} found no value in columns {looked_for}; the columns are {', '.join(columns)}")
    return PrefoptError(
        f"{source}: the rows are prompts with no responses ({found}), but this run trains on the data's "
        f"responses; use preference data (data.columns.* name its columns), or an algorithm that samples its "
        f"own pairs from prompts (see `prefopt list`)"
    )


# ----------------------------------------------------------------------------------------------------------
# one micro-batch


def pair_logps(policy: SequenceLogps, references: list[SequenceLogps] | None, loss: PreferenceLoss,
               labels: torch.Tensor | None = None) -> PairLogps:
    """Assemble what the loss declared it needs from the policy's and the references' results (primary
    reference first); ``labels`` (the batch's, for unpaired examples) are passed through."""
    chosen, rejected = policy.split()
    fields: dict[str, Any] = dict(
        policy_chosen=chosen.sums, policy_rejected=rejected.sums,
        chosen_tokens=chosen.token_counts, rejected_tokens=rejected.token_counts, labels=labels,
    )
    token_level = loss.requires_token_logps or loss.requires_token_log_collision
    if token_level:
        fields.update(
            policy_chosen_token_logps=chosen.token_logps, policy_rejected_token_logps=rejected.token_logps,
            chosen_mask=chosen.mask, rejected_mask=rejected.mask,
        )
    if loss.requires_token_log_collision:
        fields.update(
            policy_chosen_token_log_collision=chosen.token_log_collision,
            policy_rejected_token_log_collision=rejected.token_log_collision,
        )
    if references:
        ref_chosen, ref_rejected = references[0].split()
        fields.update(ref_chosen=ref_chosen.sums, ref_rejected=ref_rejected.sums)
        if token_level:
            fields.update(ref_chosen_token_logps=ref_chosen.token_logps,
                          ref_rejected_token_logps=ref_rejected.token_logps)
        if loss.multi_reference:
            halves = [r.split() for r in references]
            fields.update(refs_chosen=torch.stack([c.sums for c, _ in halves]),
                          refs_rejected=torch.stack([r.sums for _, r in halves]))
    return PairLogps(**fields)


def forward_pairs(run: Run, batch: PreferenceBatch, reference, model=None) -> tuple[PairLogps, Any]:
    """The loss of one batch under ``model`` (default: the prepared policy)."""
    policy_logps = sequence_logps(
        run.policy if model is None else model, batch, chunk_size=run.recipe.train.logprob_chunk_size,
        collision=run.loss.requires_token_log_collision, layout=run.recipe.train.layout,
    )
    reference_logps = reference(batch) if reference is not None else None
    logps = pair_logps(policy_logps, reference_logps, run.loss, batch.labels)
    return logps, run.loss(logps)


# ----------------------------------------------------------------------------------------------------------
# fit


def step_pairs(run: Run, step: int) -> list[int]:
    """The pairs of optimizer step ``step`` (all processes)."""
    if run.pairs_of_step is not None:
        return run.pairs_of_step(step)
    return planned_pairs(run.recipe.seed, len(run.train_pairs), run.recipe.train.batch_size, step)


def planned_pairs(seed: int, num_pairs: int, batch_size: int, step: int) -> list[int]:
    """The pairs of optimizer step ``step``: a seeded permutation per epoch, cut in order into full batches."""
    steps_per_epoch = num_pairs // batch_size
    epoch, k = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_pairs, generator=generator)
    return order[k * batch_size : (k + 1) * batch_size].tolist()


def process_micro_batches(run: Run, step: int) -> list[list[int]]:
    """This process's micro-batches of step ``step``.

    With ``train.group_by_length`` the step's pairs are sorted by length first, so each micro-batch holds
    pairs of similar length and little padding; the sorted micro-batches are dealt to the processes in
    turn, so every process gets as many and of similar lengths. Either way the step's set of pairs, and so
    its update, is the same.
    """
    acc, t = run.accelerator, run.recipe.train
    pairs = step_pairs(run, step)
    if not t.group_by_length:
        share = len(pairs) // acc.num_processes
        mine = pairs[acc.process_index * share : (acc.process_index + 1) * share]
        return [mine[i : i + t.micro_batch_size] for i in range(0, len(mine), t.micro_batch_size)]
    # A stable sort: ties keep the seeded order, so a resumed run forms the same micro-batches.
    by_length = sorted(pairs, key=lambda j: row_length(run.train_pairs.pairs[j], t.layout))
    micro_batches = [by_length[i : i + t.micro_batch_size] for i in range(0, len(by_length), t.micro_batch_size)]
    return micro_batches[acc.process_index :: acc.num_processes]


def learning_rate(run: Run, step: int) -> float:
    t = run.recipe.train
    if step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, run.total_steps - t.warmup_steps)
    if t.lr_scheduler == "linear":
        return t.learning_rate * max(0.0, 1.0 - progress)
    if t.lr_scheduler == "cosine":
        return t.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return t.learning_rate


def train_step(run: Run, step: int) -> dict[str, float]:
    """One optimizer step; returns the step's metrics averaged over all its pairs."""
    acc, t = run.accelerator, run.recipe.train
    micro_batches = process_micro_batches(run, step)
    # Sum of per-pair losses over the global step, times the world size because DDP averages gradients.
    scale = acc.num_processes / t.batch_size
    lr = learning_rate(run, step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr

    metrics, tokens, started = PairMetrics(), 0, time.perf_counter()
    for i, indices in enumerate(micro_batches):
        batch = collate_pairs([run.train_pairs.pairs[j] for j in indices], indices, run.tokenizer.pad_token_id)
        batch = batch.to(acc.device)
        last = i == len(micro_batches) - 1
        # Gradients are all-reduced only on the last micro-batch of the step.
        sync = contextlib.nullcontext() if last else acc.no_sync(run.policy)
        with sync, acc.autocast():
            logps, output = forward_pairs(run, batch, run.reference)
            acc.backward(output.loss.sum() * scale)
        metrics.add(logps, output)
        tokens += int(batch.attention_mask.sum())

    params = [p for p in run.policy.parameters() if p.requires_grad]
    if t.max_grad_norm is not None or _engine_state(acc):
        # FSDP and DeepSpeed know the norm of the whole gradient, not of this process's shard
        grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm is not None else math.inf)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if sync_due(run.recipe, step + 1):
        sync = run.recipe.reference.sync
        run.reference.following.sync(1.0 if sync.mode == "hard" else sync.alpha)

    elapsed = time.perf_counter() - started
    metrics.totals["tokens"] = tokens  # summed over processes with the metrics, in the same collective call
    values = metrics.reduced(acc)
    values.update(
        lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else math.nan, epoch=(step + 1) / run.steps_per_epoch,
        tokens_per_s=metrics.total("tokens") / elapsed, pairs_per_s=t.batch_size / elapsed,
    )
    return values


@torch.no_grad()
def evaluate_pairs(run: Run) -> dict[str, float]:
    """Loss and implicit-reward metrics on the held-out pairs (each process scores a shard)."""
    if run.eval_pairs is None:
        return {}
    acc = run.accelerator
    was_training = run.policy.training
    run.policy.eval()
    run.loss.train(False)
    metrics = PairMetrics()
    size = run.recipe.eval.batch_size
    indices = list(range(acc.process_index, len(run.eval_pairs), acc.num_processes))
    sharded = _sharded_params(acc)
    # Under DDP the module itself: a DDP forward may broadcast buffers, a collective call that processes
    # with unequal shares would not match. Sharded weights are gathered in every forward, so there every
    # process runs as many batches as the first one, a process whose share ran out scoring pair 0 for nothing.
    model = run.policy if sharded else acc.unwrap_model(run.policy)
    share = math.ceil(len(run.eval_pairs) / acc.num_processes) if sharded else len(indices)
    for start in range(0, share, size):
        chunk = indices[start : start + size]
        batch = collate_pairs([run.eval_pairs.pairs[j] for j in chunk or [0]], chunk or [0], run.tokenizer.pad_token_id)
        with acc.autocast():
            logps, output = forward_pairs(run, batch.to(acc.device), run.eval_reference, model)
        if chunk:
            metrics.add(logps, output)
    run.policy.train(was_training)
    run.loss.train(True)
    return {f"eval/{k}": v for k, v in metrics.reduced(acc).items()}


def evaluate_task(run: Run) -> dict[str, float]:
    """The task's own evaluator (e.g. ground-truth reward of sampled completions), on the main process."""
    if run.task is None or not run.recipe.eval.task_metrics:
        return {}
    values: dict[str, float] = {}
    if run.is_main:
        model = run.accelerator.unwrap_model(run.policy)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            values = {f"eval/{k}": float(v) for k, v in run.task.evaluate(model, run.tokenizer, run.task_data).items()}
        model.train(was_training)
    run.accelerator.wait_for_everyone()
    return values


def fit(run: Run, *, show_progress: bool = True) -> None:
    r = run.recipe
    metrics_file = run.run_dir / "metrics.jsonl"
    if run.start_step == 0 and r.eval.at_start:
        baseline = {**evaluate_pairs(run), **evaluate_task(run)}
        _record(run, metrics_file, 0, baseline)
        run.summary["eval_start"] = baseline
        if baseline:  # nothing to evaluate (no held-out pairs, no task): no empty line
            run.say(_format("eval  step 0", baseline))

    bar = tqdm(
        total=run.total_steps, initial=run.start_step, desc="training", unit="step",
        disable=not (show_progress and run.is_main), dynamic_ncols=True,
    )
    for step in range(run.start_step, run.total_steps):
        if run.before_step is not None:
            _record(run, metrics_file, step, run.before_step(run, step), before_step=True)
        values = train_step(run, step)
        if run.after_step is not None:
            run.after_step(run, step)
        done = step + 1
        if done % r.train.log_every == 0 or done == run.total_steps:
            _record(run, metrics_file, done, values)
        bar.update(1)
        # unpaired examples log no accuracy, and a step of one label no margin
        shown = {"loss": ("loss", ".4f"), "acc": ("rewards/accuracies", ".2f"), "margin": ("rewards/margins", ".3f")}
        bar.set_postfix({name: format(values[key], spec) for name, (key, spec) in shown.items() if key in values})
        if r.train.eval_every and done % r.train.eval_every == 0 and done != run.total_steps:
            evaluated = evaluate_pairs(run)
            _record(run, metrics_file, done, evaluated)
            if evaluated:
                run.say(_format(f"eval  step {done}", evaluated))
        if r.train.save_every and done % r.train.save_every == 0 and done != run.total_steps:
            save(run, done)
    bar.close()


def save(run: Run, step: int) -> None:
    """A checkpoint. Under DDP every process holds the same weights and optimizer state, so the main process
    writes them; the loss's running state is the main process's too (each process keeps its own). Under FSDP
    and DeepSpeed every process writes its part through accelerate."""
    tensors = {}
    if run.reference is not None and run.reference.following is not None:
        tensors["reference"] = run.reference.following.weights.state_dict()  # the followed weights
    extra: dict[str, Any] = {}
    if run.checkpoint_state is not None:
        extra, algorithm_tensors = run.checkpoint_state()
        tensors.update(algorithm_tensors)
    state = ckpt.TrainerState(step=step, loss_state=run.loss.state_dict(), extra=extra, tensors=tensors)
    keep = run.recipe.train.keep_checkpoints
    if _engine_state(run.accelerator):
        path = ckpt.save_accelerate_checkpoint(run.run_dir, run.accelerator, state, keep)
        log.info("checkpoint %s", path)
    elif run.is_main:
        model = run.accelerator.unwrap_model(run.policy)
        path = ckpt.save_checkpoint(run.run_dir, model, run.optimizer, state, keep)
        log.info("checkpoint %s", path)
    run.accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------
# finish


def finish(run: Run, *, end_training: bool = True) -> dict:
    """Final evaluation, the model in Hugging Face format, and ``summary.json``. ``end_training=False`` keeps
    the process group for another phase (an algorithm's next stage)."""
    final = {**evaluate_pairs(run), **evaluate_task(run)}
    _record(run, run.run_dir / "metrics.jsonl", run.total_steps, final)
    if final:
        run.say(_format(f"eval  step {run.total_steps}", final))
    # A final checkpoint makes a finished run resumable into more steps and marks it complete.
    save(run, run.total_steps)
    if run.recipe.output.save_model:
        model_dir = save_model(run)
        run.say(f"model: {model_dir}")
    run.summary.update(
        processes=run.accelerator.num_processes,
        steps=run.total_steps,
        train_pairs=len(run.train_pairs),
        eval_pairs=len(run.eval_pairs) if run.eval_pairs is not None else 0,
        skipped_rows=run.train_pairs.skipped,
        eval_end=final,
    )
    if run.is_main:
        (run.run_dir / "summary.json").write_text(json.dumps(run.summary, indent=1))
    if end_training:
        run.accelerator.end_training()  # also ends the process group, so a distributed run exits cleanly
    else:
        for tracker in run.accelerator.trackers:
            tracker.finish()
    return run.summary


def save_model(run: Run) -> Path:
    """The model in Hugging Face format, written by the main process (every process calls this: under FSDP and
    DeepSpeed gathering the weights is a collective call)."""
    acc = run.accelerator
    full = acc.get_state_dict(run.policy) if _engine_state(acc) else None
    target = run.run_dir / "model"
    if not run.is_main:
        return target
    model = acc.unwrap_model(run.policy)
    tmp = run.run_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if is_peft(model) and run.recipe.output.merge_lora:
        # In place: training is over and the last checkpoint (adapter weights) is already on disk, so no
        # second copy of the model is needed.
        model = model.merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": full} if full is not None else {}))
    run.tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def run(recipe, plugins: Plugins | None = None, *, show_progress: bool = True) -> dict:
    """What ``prefopt train`` does: the recipe's algorithm plugin, or one pass of the engine."""
    plugins = plugins or default_plugins()
    algorithm = build_algorithm(recipe, plugins)
    if algorithm is None:
        return train(recipe, plugins, show_progress=show_progress)
    return algorithm.run(recipe, plugins, show_progress=show_progress)


def train(recipe, plugins: Plugins | None = None, *, show_progress: bool = True, end_training: bool = True,
          **setup_options) -> dict:
    """Run a recipe end to end; returns the run summary (also written to ``<output.dir>/summary.json``).
    ``setup_options`` go to ``setup`` (``select_train``, ``data_model``); ``end_training`` to ``finish``."""
    run = setup(recipe, plugins, show_progress=show_progress, **setup_options)
    fit(run, show_progress=show_progress)
    return finish(run, end_training=end_training)


# ----------------------------------------------------------------------------------------------------------
# logging helpers


def _record(run: Run, path: Path, step: int, values: dict[str, float], *, before_step: bool = False) -> None:
    """Log ``values`` at ``step``. ``before_step`` marks what an algorithm measured before training step
    ``step + 1`` (a round's sampling), which a run resumed at ``step`` measures again."""
    if not values:
        return
    run.accelerator.log(values, step=step)
    if run.is_main:
        with path.open("a") as f:
            f.write(json.dumps({"step": step, **({"before_step": True} if before_step else {}), **values}) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop what a run resumed at ``step`` writes again (lines after ``step``, and what was measured before the
    step that follows it), so the file reads like one run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        record = json.loads(line) if line else None
        if record and (record["step"] < step or record["step"] == step and not record.get("before_step")):
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def _format(head: str, values: dict[str, float]) -> str:
    shown = ", ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in sorted(values.items()))
    return f"{head}: {shown}"


def _flat_config(recipe) -> dict[str, Any]:
    """The recipe as flat scalars, which is what TensorBoard's hparams accept."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    walk("", recipe.model_dump(mode="json"))
    return flat
