"""sDPO, stepwise DPO: the data in stages, each stage held to (and started from) the previous stage's model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from prefopt import Algorithm, AlgorithmConfig, Phase, derive_recipe, hookimpl
from prefopt.data.types import TokenizedPairs
from prefopt.errors import PrefoptError
from prefopt.integrity import checksum_path, verify_checksum, write_checksum
from prefopt.paths import atomic_write_text, replace_dir, staging_dir

PLAN_FILE = "stages.json"


class StepwiseConfig(AlgorithmConfig):
    stages: Optional[int] = Field(
        None, ge=2, description="Number of stages for split random or score (the paper uses 2). For split "
        "column it is the number of distinct values (or of entries in order).",
    )
    split: Literal["random", "column", "score"] = Field(
        "random",
        description="How pairs are assigned to stages. random: a seeded shuffle cut in equal parts. column: one "
        "stage per value of data column `column` (the paper: one dataset, then another). score: an easy-to-hard "
        "curriculum by score_model's preference margin (mean log-prob per token, chosen minus rejected), the "
        "pairs it already prefers most first.",
    )
    column: Optional[str] = Field(None, description="split column: the data column naming each pair's stage.")
    order: Optional[list[str]] = Field(
        None, description="split column: the column's values in stage order (default: sorted values)."
    )
    score_model: Optional[str] = Field(
        None, description="split score: the model that ranks pairs (hub id or dir; default the initial model)."
    )

    @model_validator(mode="after")
    def _split_options(self) -> "StepwiseConfig":
        if self.split == "column":
            if self.column is None:
                raise ValueError("algorithm.column is required for split column")
            if self.stages is not None and self.order is not None and self.stages != len(self.order):
                raise ValueError(f"algorithm.stages ({self.stages}) differs from the {len(self.order)} values in order")
        else:
            if self.stages is None:
                raise ValueError(f"algorithm.stages is required for split {self.split} (the paper uses 2)")
            if self.column is not None or self.order is not None:
                raise ValueError("algorithm.column and algorithm.order are for split column")
        if self.score_model is not None and self.split != "score":
            raise ValueError("algorithm.score_model is for split score")
        return self


class Stepwise(Algorithm):
    """Stepwise DPO: train on the data stage by stage; stage t starts from and is held to stage t-1's model.

    Kim et al. (2024), "sDPO: Don't Use Your Data All at Once", arXiv:2403.19270.

    The preference pairs are partitioned into stages D_1..D_T (``split``: a seeded random partition, a data
    column such as the source dataset, or an easy-to-hard ranking by a scoring model). Stage t is an ordinary
    run of the recipe on D_t whose initial policy *and* reference are M_{t-1}, the model stage t-1 saved
    (M_0 is model.path). So the reference's lower bound rises from stage to stage, unlike TR-DPO, where the
    reference moves within one run. Every ``train`` option applies to each stage; every pair is in exactly
    one stage, and within its stage the engine uses it once per epoch.

    Files: ``<output.dir>/stages.json`` (which pairs each stage holds, by position in the training data, and
    the data's fingerprint), ``stages/stage-<t>/`` (a complete run: checkpoints, metrics, summary, model),
    and the final model in ``<output.dir>/model``. A rerun skips finished stages and resumes the unfinished
    one from its newest checkpoint. With LoRA, each stage's adapter is merged into its saved model, which
    the next stage loads and adapts afresh.
    """

    name = "stepwise"
    Config = StepwiseConfig
    paper = "Kim et al. 2024, sDPO: Don't Use Your Data All at Once, arXiv:2403.19270"

    def check(self, recipe) -> None:
        if recipe.reference.path is not None or recipe.reference.sync is not None:
            raise PrefoptError("algorithm stepwise makes each stage's reference the previous stage's model; "
                               "remove reference.path and reference.sync")
        if recipe.model.adapter is not None:  # stage 2 on would load it again onto stage 1's merged model
            raise PrefoptError("algorithm stepwise starts each stage from the previous stage's merged model, onto "
                               "which model.adapter would be loaded again; give the adapter merged into its base "
                               "as model.path (with model.lora or model.peft for a fresh adapter each stage)")

    def run(self, recipe, plugins, *, show_progress: bool = True) -> dict:
        from accelerate import PartialState

        from prefopt import engine

        run_dir = Path(recipe.output.dir)
        first_model = recipe.model.path
        summaries, stage_model = [], first_model
        total = None
        for index in range(1, 10_000):
            stage_dir = run_dir / "stages" / f"stage-{index}"
            last = total is not None and index == total
            stage_recipe = derive_recipe(recipe, plugins, _stage_changes(stage_model, stage_dir, index, last),
                                         f"{recipe.output.dir} stage {index}")
            summary_file = stage_dir / "summary.json"
            if summary_file.exists():
                summary = json.loads(summary_file.read_text())
            else:
                # every stage reads the data as the initial model built it, and trains on its own part of it
                phase = Phase(
                    data_model=first_model,
                    select_train=lambda pairs, rows, i=index: self._stage_pairs(recipe, run_dir, pairs, rows, i),
                )
                summary = engine.train(stage_recipe, plugins, phase=phase, show_progress=show_progress,
                                       end_training=False)
            summaries.append(summary)
            total = len(_read_plan(run_dir / PLAN_FILE)["stages"])
            stage_model = str(stage_dir / "model")
            if index == total:
                break
        summary = {
            "algorithm": "stepwise", "stages": summaries, "eval_start": summaries[0].get("eval_start", {}),
            "eval_end": summaries[-1].get("eval_end", {}), "steps": sum(s["steps"] for s in summaries),
        }
        state = PartialState()
        if state.is_main_process:
            if recipe.output.save_model:
                _link_tree(Path(stage_model), run_dir / "model")
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        # Stages keep the process group (each is one phase of this run); end it once, as a plain run does.
        state.wait_for_everyone()
        state.destroy_process_group()
        return summary

    # ------------------------------------------------------------------------------------------------------
    # the partition, computed once and kept in stages.json

    def _stage_pairs(self, recipe, run_dir: Path, pairs: TokenizedPairs, rows, index: int) -> TokenizedPairs:
        plan_file = run_dir / PLAN_FILE
        plan = _read_plan(plan_file)
        if plan is not None:
            if plan["data"] != pairs.fingerprint:
                raise PrefoptError(
                    f"{plan_file}: the training data changed since this run was split into stages; "
                    "use a new output.dir"
                )
        else:
            plan = {"data": pairs.fingerprint, "split": self.config.split,
                    "stages": self._partition(recipe, pairs, rows)}
            _write_plan(plan_file, plan)
        stages = plan["stages"]
        return pairs.subset(stages[index - 1]["pairs"], f"stage {index} of {len(stages)}")

    def _partition(self, recipe, pairs: TokenizedPairs, rows) -> list[dict]:
        cfg, n = self.config, len(pairs)
        if cfg.split == "random":
            order = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed)).tolist()
            return [{"pairs": sorted(part)} for part in _cut(order, cfg.stages)]
        if cfg.split == "score":
            margins = _preference_margins(recipe, pairs, self.config.score_model)
            order = sorted(range(n), key=lambda i: -margins[i])  # easiest (most preferred already) first
            return [{"pairs": part, "mean_margin": sum(margins[i] for i in part) / max(1, len(part))}
                    for part in _cut(order, cfg.stages)]
        if cfg.column not in rows.column_names:
            raise PrefoptError(f"algorithm.column {cfg.column!r} is not a column of the training data "
                               f"(columns: {', '.join(rows.column_names)})")
        values = [str(rows[pair.row][cfg.column]) for pair in pairs.pairs]
        order = cfg.order or sorted(set(values))
        unknown = sorted(set(values) - set(order))
        if unknown:
            raise PrefoptError(f"algorithm.order lacks value(s) {unknown[:3]} of column {cfg.column!r}; list every "
                               "value, in stage order")
        if cfg.stages is not None and cfg.stages != len(order):
            raise PrefoptError(f"algorithm.stages is {cfg.stages} but column {cfg.column!r} has {len(order)} values")
        return [{"value": v, "pairs": [i for i, x in enumerate(values) if x == v]} for v in order]


def _stage_changes(model_path: str, stage_dir: Path, index: int, last: bool) -> dict:
    """How the recipe of stage ``index`` differs from the user's: no algorithm section, its own run directory,
    the previous stage's model as policy and reference."""
    changes = {"algorithm": None, "model.path": model_path, "output.dir": str(stage_dir)}
    if index > 1:
        changes["model.revision"] = None  # the previous stage's model is a local directory
        changes["eval.at_start"] = False  # the previous stage's final evaluation already scored this model
    # The next stage loads this stage's model, so every stage but the last saves it merged.
    if not last:
        changes.update({"output.save_model": True, "output.merge_lora": True})
    return changes


def _cut(order: list[int], parts: int) -> list[list[int]]:
    """``order`` in ``parts`` consecutive pieces whose sizes differ by at most one."""
    size, extra = divmod(len(order), parts)
    pieces, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        pieces.append(order[start:end])
        start = end
    return pieces


def _preference_margins(recipe, pairs: TokenizedPairs, score_model: str | None) -> list[float]:
    """Per pair, mean log-prob per token of chosen minus rejected under the scoring model, through the
    reference cache (a later run, or a stage reference of the same model and pairs, reuses it)."""
    from prefopt.models.loading import base_weights_fingerprint, load_causal_lm, load_tokenizer, resolve_model_path
    from prefopt.reference.cache import cached_reference
    from prefopt.reference.providers import LiveReference

    m = recipe.model
    path = resolve_model_path(score_model or m.path)
    tokenizer = load_tokenizer(path, trust_remote_code=m.trust_remote_code)
    model = load_causal_lm(path, dtype=m.dtype, trust_remote_code=m.trust_remote_code).requires_grad_(False)
    cached, _ = cached_reference(
        LiveReference(model, chunk_size=recipe.train.logprob_chunk_size), pairs,
        weights=base_weights_fingerprint(model), dtype=f"{m.dtype}/no", batch_size=recipe.reference.batch_size,
        pad_id=tokenizer.pad_token_id, show_progress=False,
    )
    del model
    counts = (cached.offsets[1:] - cached.offsets[:-1]).clamp(min=1).double()
    means = cached.sums.double() / counts
    n = len(pairs)
    return (means[:n] - means[n:]).tolist()


def _read_plan(plan_file: Path) -> dict | None:
    """stages.json as it was written, None before the data is split. A damaged one stops the run rather than
    being split again unasked: stages may have trained on it."""
    if not plan_file.exists():
        return None
    # a plan written before checksums were kept has none: it is read as it is
    problem = verify_checksum(plan_file) if checksum_path(plan_file).exists() else None
    if problem is None:
        try:
            return json.loads(plan_file.read_text())
        except ValueError as exc:
            problem = f"not JSON: {type(exc).__name__}"
    raise PrefoptError(
        f"{plan_file} is damaged ({problem}); delete it and {checksum_path(plan_file).name} to split the data "
        "again (the same seed and data give the same split), or use a new output.dir"
    )


def _write_plan(plan_file: Path, plan: dict) -> None:
    """stages.json atomically, then its checksum (checked by ``_read_plan``)."""
    atomic_write_text(plan_file, json.dumps(plan, indent=1))
    write_checksum(plan_file)


def _link_tree(source: Path, target: Path) -> None:
    """``target`` as a copy of ``source`` made of hard links where the filesystem allows (no second copy of
    the weights on disk), replaced atomically."""

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    staging = staging_dir(target, "linking")
    try:
        shutil.copytree(source, staging, copy_function=link, dirs_exist_ok=True)
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a no-op once the rename succeeded


@hookimpl
def prefopt_register_algorithms():
    return [Stepwise]
