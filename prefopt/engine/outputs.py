"""What a run leaves behind: checkpoints while it trains, then the final model with its model card and
``summary.json``, and the model pushed to the hub when the recipe asks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from prefopt.api.algorithm import RESERVED_TENSOR_SETS
from prefopt.engine import checkpoint as ckpt
from prefopt.engine.distributed import accelerate_owns_state
from prefopt.engine.evaluation import evaluate_pairs, evaluate_task
from prefopt.engine.markers import MARKER_NAME, is_marked, write_marker
from prefopt.engine.nonfinite import check_finite_weights
from prefopt.engine.records import format_metrics, record
from prefopt.disk import writing
from prefopt.engine.run import Run
from prefopt.engine.samples import log_completions
from prefopt.engine.trackers import close_trackers
from prefopt.errors import PrefoptError
from prefopt.locks import release_run_dir
from prefopt.models.loading import is_peft
from prefopt.models.peft import merged_model
from prefopt.paths import atomic_write_text, replace_dir
from prefopt.publish.card import gather_facts, write_card
from prefopt.publish.hub import push_folder, token_from_env
from prefopt.recipe import dump_recipe

log = logging.getLogger(__name__)


def save(run: Run, step: int) -> None:
    """A checkpoint. Under DDP every process holds the same weights and optimizer state, so the main process
    writes them; the loss's running state is the main process's too (each process keeps its own). Under FSDP
    and DeepSpeed every process writes its part through accelerate. Weights that are not finite are never
    written (``check_finite_weights``)."""
    check_finite_weights(run, step)
    tensors = {}
    if run.reference is not None and run.reference.following is not None:
        tensors["reference"] = run.reference.following.weights.state_dict()  # the followed weights
    extra, phase_tensors = run.phase.checkpoint_state()  # an algorithm's own state, e.g. a replay buffer
    clashing = sorted(RESERVED_TENSOR_SETS & phase_tensors.keys())
    if clashing:
        raise ValueError(f"{type(run.phase).__name__}.checkpoint_state names tensor sets {clashing}, which the "
                         "engine's own checkpoint files use; rename them")
    tensors.update(phase_tensors)
    counters = {"skipped_steps": run.skipped_steps, "nonfinite_in_a_row": run.nonfinite_in_a_row,
                "num_tokens": run.num_tokens}
    if run.early_stopping is not None:
        counters["early_stopping"] = run.early_stopping.state_dict()
    state = ckpt.TrainerState(step=step, loss_state=run.loss.state_dict(), extra=extra, tensors=tensors,
                              recipe=dump_recipe(run.recipe), counters=counters)
    keep = run.recipe.train.keep_checkpoints
    if accelerate_owns_state(run.accelerator):
        path = ckpt.save_accelerate_checkpoint(run.run_dir, run.accelerator, state, keep)
        log.info("checkpoint %s", path)
    elif run.is_main:
        model = run.accelerator.unwrap_model(run.policy)
        path = ckpt.save_checkpoint(run.run_dir, model, run.optimizer, state, keep)
        log.info("checkpoint %s", path)
    run.accelerator.wait_for_everyone()


def finish(run: Run, *, end_training: bool = True) -> dict:
    """Final evaluation, the model in Hugging Face format with its model card, ``summary.json``, the push to
    the hub that ``output.push_to_hub`` asks for, and the trackers closed. ``end_training=False`` keeps the
    process group for another phase (an algorithm's next stage)."""
    final = {**evaluate_pairs(run), **evaluate_task(run)}
    record(run, run.run_dir / "metrics.jsonl", run.total_steps, final)
    if final:
        run.say(format_metrics(f"eval  step {run.total_steps}", final))
    log_completions(run, run.total_steps, final=True)  # eval.samples: the end's completions
    # A final checkpoint makes a finished run resumable into more steps and marks it complete.
    save(run, run.total_steps)
    run.summary.update(
        processes=run.accelerator.num_processes,
        steps=run.total_steps,
        train_pairs=len(run.train_pairs),
        eval_pairs=len(run.eval_pairs) if run.eval_pairs is not None else 0,
        skipped_rows=run.train_pairs.skipped,
        eval_end=final,
    )
    if run.recipe.train.on_nonfinite == "skip_step":
        run.summary["skipped_steps"] = run.skipped_steps
    pushed = None
    if run.recipe.output.save_model:
        model_dir = save_model(run)  # after the summary's update: the model card reports it
        run.say(f"model: {model_dir}")
    if run.is_main:
        atomic_write_text(run.run_dir / "summary.json", json.dumps(run.summary, indent=1))
        if run.recipe.output.save_model:
            pushed = push_model(run, model_dir)
    release_run_dir(run.run_dir)  # another process may write output.dir now
    close_trackers(run.accelerator)
    if end_training:
        run.accelerator.end_training()  # also ends the process group, so a distributed run exits cleanly
    if pushed is not None:
        raise pushed  # only now: the run itself is complete, and the message says so
    return run.summary


def push_model(run: Run, model_dir: Path) -> PrefoptError | None:
    """``model_dir`` to the hub repository ``output.push_to_hub`` names, if it names one; a failure is returned
    (the caller finishes the run, then raises it), saying how to push the finished run again."""
    push = run.recipe.output.push_to_hub
    if push is None:
        return None
    try:
        token = token_from_env(push.token_env, "output.push_to_hub.token_env")
        url = push_folder(model_dir, push.repo_id, private=push.private, revision=push.revision, token=token)
    except PrefoptError as exc:
        return PrefoptError(f"{exc}. The run is complete in {run.run_dir}; push it with `prefopt push "
                            f"{run.run_dir} {push.repo_id}`")
    run.say(f"pushed the model to {push.repo_id}: {url}")
    return None


def save_model(run: Run) -> Path:
    """The model in Hugging Face format, written by the main process (every process calls this: under FSDP and
    DeepSpeed gathering the weights is a collective call). It replaces a ``model/`` only if prefopt wrote it. A
    reward model is saved as the sequence classifier it is (its config keeps the one output and the pad id it
    scores by), with a LoRA adapter and the trained score head merged in as for a causal LM, so the folder loads
    with ``AutoModelForSequenceClassification`` and the ``reward_model`` judge."""
    acc = run.accelerator
    target = run.run_dir / "model"
    check_model_dir(target)
    full = acc.get_state_dict(run.policy) if accelerate_owns_state(acc) else None
    if not run.is_main:
        return target
    model = acc.unwrap_model(run.policy)
    tmp = run.run_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    adapter = is_peft(model) and not run.recipe.output.merge_lora
    if is_peft(model) and run.recipe.output.merge_lora:
        # peft's own merge, for every adapter type, in place: training is over and the last checkpoint
        # (adapter weights) is already on disk, so no second copy of the model is needed. Quantized base
        # weights are merged into an unquantized copy instead (``merged_model``).
        model = merged_model(model)
    with writing(target, "the model", elsewhere="output.dir", cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": full} if full is not None else {}))
        run.tokenizer.save_pretrained(tmp)
        write_model_card(run, tmp, target, adapter)  # also replaces the empty template card PEFT writes
        write_marker(tmp, "model")
        replace_dir(tmp, target)  # the old model stays whole until the new one is complete
    return target


def write_model_card(run: Run, folder: Path, target: Path, adapter: bool) -> None:
    """The model card of the model being written to ``folder`` (``target`` once in place): its loading snippet
    names the hub repository it will be pushed to, else ``target``."""
    push = run.recipe.output.push_to_hub
    model_id = push.repo_id if push is not None else str(target.resolve())
    write_card(folder, gather_facts(run.recipe, type(run.loss), run.summary, run.run_dir, adapter=adapter,
                                    model_id=model_id, reward_model=run.loss.scores_sequences))


def check_model_dir(target: Path) -> None:
    """Refuse to replace a ``model/`` that prefopt did not write (the user's own files): checked when a run
    starts, so a long run does not end on it, and again before the model is written."""
    if not target.exists() or is_marked(target, "model") or (target.is_dir() and not any(target.iterdir())):
        return
    raise PrefoptError(
        f"{target} holds files prefopt did not write (no {MARKER_NAME} marker), and the run would replace it with "
        "its final model; move that folder elsewhere, or set output.save_model=false"
    )
