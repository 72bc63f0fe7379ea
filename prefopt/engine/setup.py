"""``setup``: everything a run needs, built from a recipe, and a checkpoint restored when there is one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from prefopt.api.task import TaskContext
from prefopt.data.splits import load_split
from prefopt.data.types import TokenizedPairs
from prefopt.engine import checkpoint as ckpt
from prefopt.engine.distributed import (
    accelerate_owns_state, check_distributed, configure_deepspeed, cpu_processes, sharded_params,
)
from prefopt.engine.records import flat_config, truncate_metrics
from prefopt.engine.run import Run
from prefopt.errors import PrefoptError
from prefopt.models.loading import add_lora, load_causal_lm, load_tokenizer, resolve_model_path
from prefopt.paths import cache_dir
from prefopt.recipe import build_loss, dump_recipe
from prefopt.reference.setup import assemble, build_extra_caches, build_primary, check_reference_recipe
from prefopt.registry.loading import Plugins, default_plugins

log = logging.getLogger(__name__)


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
        cpu=cpu_processes(),
        mixed_precision=recipe.train.mixed_precision,
        log_with=list(recipe.output.trackers) or None,
        project_dir=str(run_dir),
    )
    check_distributed(recipe, accelerator)
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
        check_reference_recipe(recipe, loss, sharded_params(accelerator))
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
    train_pairs = load_split(recipe, tokenizer, *train_source, recipe.data.max_train_pairs, loss, say, select_train,
                             prompt_only="accept" if pairs_from_prompts else "refuse")
    eval_pairs = (
        load_split(recipe, tokenizer, *eval_source, recipe.data.max_eval_pairs, loss, say, prompt_only="drop")
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
    configure_deepspeed(accelerator, t, t.batch_size // (t.micro_batch_size * world))
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
        if accelerate_owns_state(accelerator):
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
        truncate_metrics(run_dir / "metrics.jsonl", start_step)

    if recipe.output.trackers:
        accelerator.init_trackers("prefopt", config=flat_config(recipe))

    return Run(
        recipe=recipe, accelerator=accelerator, run_dir=run_dir, tokenizer=tokenizer, policy=policy,
        optimizer=optimizer, loss=loss, train_pairs=train_pairs, eval_pairs=eval_pairs, references=references,
        task=task, task_data=task_data, start_step=start_step,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        accumulation=t.batch_size // (t.micro_batch_size * world), summary=summary,
        resumed_from=resume_from, resumed_extra=resumed_extra,
    )


def build_task_data(recipe, plugins: Plugins, model_path: str, tokenizer, load_model, show_progress: bool):
    """The recipe's task and the files it built (or found in its cache)."""
    task_cls = plugins.tasks.get(recipe.data.task.name)
    task = task_cls(task_cls.Config.model_validate(recipe.data.task.model_dump(exclude={"name"})))
    ctx = TaskContext(
        model_id=model_path, tokenizer=tokenizer, load_model=load_model,
        cache_dir=cache_dir("tasks", task_cls.name), seed=recipe.seed, show_progress=show_progress,
    )
    return task, task.build(ctx)
