"""The recipe schema, assembled after plugins load.

The engine owns every section but the plugins' own: ``loss`` is a union over every registered loss's
``Config`` (tagged by ``loss.name``), ``data.task`` one over every registered task's and ``algorithm``
one over every registered algorithm's (the kinds ``registry.kinds.KINDS`` marks ``in_schema``). So a
plugin owns its options, their bounds and their docs, and a recipe can name any installed plugin.
Reading and validating a recipe file is ``load.py``; the one-line problems it reports, ``problems.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator

from prefopt.errors import PrefoptError
from prefopt.registry.loading import Plugins, Registry


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="Rank of the low-rank update.")
    alpha: float = Field(32, gt=0, description="Scale numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Union[list[str], Literal["all-linear"]] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer but the head."
    )


class ModelConfig(Section):
    path: str = Field(
        "smollm2-135m-instruct",
        description="Hub id, local directory, or an embedded model name (smollm2-135m-instruct).",
    )
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the weights are loaded in; use train.mixed_precision for autocast."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model. Off unless you trust it.")
    attn_implementation: Optional[str] = Field(None, description="transformers attention backend, e.g. sdpa or eager.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    lora: Optional[LoraConfig] = Field(None, description="Train a LoRA adapter instead of all weights.")


class ColumnsConfig(Section):
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = Field("completion", description="Unpaired data: the column holding each completion.")
    label: str = Field("label", description="Unpaired data: the column saying desirable (true/1) or not (false/0).")


class DataConfig(Section):
    path: Optional[str] = Field(None, description="Hub dataset id, local directory, file or glob.")
    task: Optional[Any] = Field(None, description="A task that builds the data, e.g. {name: sentiment}.")
    subset: Optional[str] = Field(None, description="Hub dataset configuration name.")
    train_split: str = "train"
    eval_split: Optional[str] = Field(None, description="Split for held-out metrics; none means no eval.")
    columns: ColumnsConfig = ColumnsConfig()
    format: Literal["auto", "standard", "conversational", "implicit_prompt", "unpaired", "prompt_only"] = Field(
        "auto",
        description="Row format; auto detects it. unpaired: prompt, completion, label rows (KTO-style); "
        "paired data is split for a loss that trains on unpaired examples. prompt_only: a prompt column (text "
        "or messages) and no responses, for the algorithms that sample and judge their own pairs.",
    )
    max_length: int = Field(512, ge=2, description="Prompt plus response tokens; responses are cut to fit.")
    max_prompt_length: Optional[int] = Field(256, ge=1, description="Prompts are cut from the left to this.")
    append_eos: bool = Field(True, description="End each response with the EOS token (never doubled).")
    invalid_rows: Literal["error", "skip"] = Field(
        "error", description="Unusable rows stop the run (error) or are counted, reported and left out (skip)."
    )
    max_train_pairs: Optional[int] = Field(None, ge=1, description="Use only the first N training pairs "
                                           "(prompts, for prompt-only data).")
    max_eval_pairs: Optional[int] = Field(None, ge=1, description="Use only the first N held-out pairs.")

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.path is None) == (self.task is None):
            raise ValueError("set exactly one of data.path (a dataset) or data.task (a task that builds one)")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be below data.max_length "
                f"({self.max_length}) to leave room for the response"
            )
        return self


class SyncConfig(Section):
    """A reference that follows the policy (TR-DPO, arXiv 2404.09656): every ``every`` optimizer steps,
    ref <- alpha * policy + (1 - alpha) * ref; hard sync is alpha = 1. An EMA of the policy with decay d is
    mode soft, alpha 1 - d, every 1. Under LoRA only the adapter weights are followed."""

    mode: Literal["hard", "soft"] = Field(..., description="hard: copy the policy; soft: mix alpha of it in.")
    every: int = Field(512, ge=1, description="Optimizer steps between syncs (TR-DPO's tau).")
    alpha: Optional[float] = Field(
        None, gt=0, le=1, description="Soft sync: the policy's share of the new reference (TR-DPO: 0.6)."
    )

    @model_validator(mode="after")
    def _alpha_for_mode(self) -> "SyncConfig":
        if self.mode == "hard" and self.alpha not in (None, 1.0):
            raise ValueError("reference.sync.alpha is for mode soft; a hard sync copies the policy (alpha 1)")
        if self.mode == "soft" and self.alpha is None:
            raise ValueError("reference.sync.alpha is required for mode soft (TR-DPO uses 0.6)")
        return self


class ReferenceConfig(Section):
    kind: Literal["auto", "cache", "live"] = Field(
        "auto",
        description="cache: reference log-probs computed once into an on-disk cache (the default for a fixed "
        "reference); live: computed every step by a frozen model (or the policy with its LoRA adapter off).",
    )
    path: Optional[str] = Field(
        None, description="Reference weights; none means the policy's initial weights (LoRA: adapter disabled)."
    )
    batch_size: int = Field(8, ge=1, description="Pairs per forward while building the cache.")
    extra: list[str] = Field(
        [], description="More reference models (hub ids or local dirs) for a multi-reference loss such as "
        "mrpo; each is computed once into the cache, so none is in memory while training.",
    )
    sync: Optional[SyncConfig] = Field(
        None, description="Make the reference follow the policy: {mode: hard|soft, every: N, alpha: a} (TR-DPO)."
    )


class _NamedWithOptions(Section):
    """``name`` plus that thing's own options beside it; a bare string in the recipe is the name alone."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimizerConfig(_NamedWithOptions):
    name: str = Field("AdamW", description="A torch.optim class: AdamW, SGD, Adafactor, ...")


class ScheduleConfig(_NamedWithOptions):
    name: str = Field("linear", description="A transformers schedule: constant, linear, cosine, cosine_with_min_lr, "
                                            "warmup_stable_decay, ...")


class TrainConfig(Section):
    epochs: int = Field(1, ge=1, description="Passes over the training pairs (unless max_steps ends sooner).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Pairs per optimizer step, over all processes.")
    micro_batch_size: int = Field(
        2, ge=1, description="Pairs per forward pass per process; accumulation makes up the rest."
    )
    learning_rate: float = Field(5e-6, gt=0)
    lr_scheduler: ScheduleConfig = Field(
        default_factory=ScheduleConfig,
        description="The schedule by name (constant, linear, cosine, ...), or {name: ..., <its options>} such as "
        "{name: cosine_with_min_lr, min_lr_rate: 0.1}; every schedule warms up over warmup_steps.",
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup, the first at 1/warmup_steps of the rate.")
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam-family optimizers: the first of their betas.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="Adam-family optimizers: the second of their betas.")
    adam_eps: float = Field(1e-8, gt=0, description="Adam-family optimizers: their eps.")
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig,
        description="A torch.optim class by name, or {name: ..., <its options>} such as {name: SGD, momentum: 0.9}; "
        "its rate is learning_rate, its decay weight_decay, an Adam's betas and eps the adam_* keys.",
    )
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Clip the gradient norm; none to not clip.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast through accelerate.")
    logprob_chunk_size: int = Field(
        1024, ge=1, description="Response tokens scored per chunk; bounds the float32 logits held at once."
    )
    layout: Literal["padded", "packed", "prefix_shared"] = Field(
        "padded",
        description="How a batch goes through the model: padded rows; packed, every sequence in one row without "
        "padding; or prefix_shared, one row per pair with the prompt computed once. All give the same numbers; "
        "models that cannot confine attention as a layout needs use padded.",
    )
    group_by_length: bool = Field(
        True, description="Sort each step's pairs by length before cutting micro-batches, for less padding."
    )
    log_every: int = Field(1, ge=1, description="Optimizer steps between metric lines.")
    eval_every: Optional[int] = Field(None, ge=1, description="Optimizer steps between held-out evaluations.")
    save_every: Optional[int] = Field(None, ge=1, description="Optimizer steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk; older ones are deleted.")
    on_nonfinite: Literal["stop", "skip_step"] = Field(
        "stop", description="A step whose loss or gradient norm is inf or NaN: stop (exit status 3, the newest "
        "checkpoint kept), or skip_step (no update, counted as skipped_steps in metrics and summary.json).",
    )
    max_nonfinite_in_a_row: int = Field(
        3, ge=1, description="skip_step: stop (exit status 3) after this many non-finite steps in a row."
    )
    allow_changed: list[str] = Field(
        [], description="Keys (or sections) that may differ from the checkpoint's recipe when the run resumes, "
        "e.g. [train.learning_rate]; train.max_steps, train.epochs, eval, logging and output keys always may.",
    )

    @field_validator("lr_scheduler", "optimizer", mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value  # `lr_scheduler: linear`

    # prefopt.engine.optim is imported here, not at the top: the engine package imports the recipe package.
    @field_validator("lr_scheduler")
    @classmethod
    def _known_schedule(cls, value: ScheduleConfig, info: ValidationInfo) -> ScheduleConfig:
        from prefopt.engine.optim import check_schedule

        check_schedule(value.name, value.options, info.data.get("learning_rate"))
        return value

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: OptimizerConfig, info: ValidationInfo) -> OptimizerConfig:
        from prefopt.engine.optim import check_optimizer

        check_optimizer(value.name, value.options, info.data)
        return value


class EvalConfig(Section):
    at_start: bool = Field(True, description="Evaluate before the first step, for a baseline.")
    batch_size: int = Field(8, ge=1, description="Pairs per forward during held-out evaluation.")
    task_metrics: bool = Field(True, description="Also run the task's own evaluator (e.g. sampled rewards).")


class OutputConfig(Section):
    dir: str = Field("runs/prefopt", description="Run directory: checkpoints, metrics, the final model.")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: continue from the newest checkpoint in dir when there is one."
    )
    save_model: bool = Field(True, description="Write the final model in Hugging Face format with its tokenizer.")
    merge_lora: bool = Field(True, description="Merge a LoRA adapter into the saved model (else save the adapter).")
    trackers: list[Literal["tensorboard"]] = Field(["tensorboard"], description="accelerate trackers to log to.")


ENGINE_SECTIONS = ("model", "data", "reference", "train", "eval", "output")


def _tagged_union(registry: Registry) -> Any:
    """A pydantic union over every registered plugin's Config, tagged by its ``name`` field."""
    what = registry.kind
    members = []
    for info in registry.infos():
        members.append(
            create_model(
                f"{info.cls.__name__}Options",
                __base__=info.cls.Config,
                name=(Literal[info.name], Field(description=f"The {what}: {info.cls.summary()}")),
            )
        )
    if not members:
        raise PrefoptError(f"no {what} plugin is registered; is prefopt installed (pip install -e .)?")
    if len(members) == 1:
        return members[0]
    return Annotated[Union[tuple(members)], Field(discriminator="name")]


def recipe_model(plugins: Plugins) -> type[BaseModel]:
    """The Recipe schema for the plugins that are loaded now."""
    task_spec = _tagged_union(plugins.tasks) if len(plugins.tasks) else Any
    algorithm_spec = _tagged_union(plugins.algorithms) if len(plugins.algorithms) else Any
    data_model = create_model("DataSection", __base__=DataConfig, task=(Optional[task_spec], None))
    return create_model(
        "Recipe",
        __config__=ConfigDict(extra="forbid", frozen=True),
        seed=(int, Field(0, description="Seeds data order, initialization and sampling.")),
        model=(ModelConfig, ModelConfig()),
        data=(data_model, ...),
        loss=(_tagged_union(plugins.losses), ...),
        algorithm=(Optional[algorithm_spec], Field(
            None, description="Phases of training (e.g. {name: stepwise}); none: one pass of the engine.")),
        reference=(ReferenceConfig, ReferenceConfig()),
        train=(TrainConfig, TrainConfig()),
        eval=(EvalConfig, EvalConfig()),
        output=(OutputConfig, OutputConfig()),
    )
