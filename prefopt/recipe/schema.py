"""The recipe schema, assembled after plugins load.

The engine owns every section but the plugins' own: ``loss`` is a union over every registered loss's
``Config`` (tagged by ``loss.name``), ``data.task`` one over every registered task's and ``algorithm``
one over every registered algorithm's (the kinds ``registry.kinds.KINDS`` marks ``in_schema``). So a
plugin owns its options, their bounds and their docs, and a recipe can name any installed plugin.
Reading and validating a recipe file is ``load.py``; the one-line problems it reports, ``problems.py``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator

from prefopt.api.algorithm import PluginSpec
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


class QuantizationConfig(Section):
    bits: Literal[4, 8] = Field(..., description="4: NF4 or FP4 weights (QLoRA); 8: LLM.int8 weights.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit only: the 4-bit data type.")
    double_quant: bool = Field(True, description="4-bit only: quantize the block scales too (QLoRA's, ~0.4 bit a "
                               "weight less).")


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
    peft: Optional[dict[str, Any]] = Field(
        None, description="Train a PEFT adapter of any tuner type peft has, with peft's own fields: {type: LORA, "
        "r: 16, lora_alpha: 32, use_dora: true}, {type: LORA, use_rslora: true, init_lora_weights: pissa}, "
        "{type: IA3}. Checked by peft's config class; task_type is CAUSAL_LM. model.lora is the short form of a "
        "LORA one.",
    )
    adapter: Optional[str] = Field(
        None, description="Start from an existing PEFT adapter folder (e.g. an SFT run's) and train it on; the "
        "reference is that adapter's model as it starts, unless reference.path names another.",
    )
    quantization: Optional[QuantizationConfig] = Field(
        None, description="Load the base weights 4-bit or 8-bit through bitsandbytes (QLoRA); needs an adapter.",
    )

    # prefopt.models.peft is imported here, not at the top: it imports peft (seconds), which only recipes
    # that set model.peft need.
    @field_validator("peft")
    @classmethod
    def _peft_fields(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        if value is None:
            return None
        from pydantic import ValidationError
        from pydantic_core import InitErrorDetails, PydanticCustomError

        from prefopt.models.peft import check_peft_section

        checked, problems = check_peft_section(value)
        if not problems:
            return checked
        raise ValidationError.from_exception_data("model.peft", [
            InitErrorDetails(type=PydanticCustomError("value_error", "{message}", {"message": message}), loc=loc,
                             input=value)
            for loc, message in problems
        ])

    @model_validator(mode="after")
    def _one_adapter(self) -> "ModelConfig":
        named = [key for key in ("lora", "peft", "adapter") if getattr(self, key) is not None]
        if len(named) > 1:
            raise ValueError(f"set one of model.lora, model.peft (a fresh adapter) or model.adapter (an existing "
                             f"one), not {' and '.join('model.' + key for key in named)}")
        if self.quantization is not None and not named:
            raise ValueError("model.quantization freezes the base weights, so only an adapter can train: set "
                             "model.lora, model.peft or model.adapter")
        return self

    @property
    def has_adapter(self) -> bool:
        """Whether the policy trains an adapter (model.lora, model.peft or model.adapter) over frozen weights."""
        return self.lora is not None or self.peft is not None or self.adapter is not None


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
    layout: Literal["auto", "padded", "packed", "prefix_shared"] = Field(
        "auto",
        description="How a batch goes through the model: padded rows; packed, every sequence in one row without "
        "padding; prefix_shared, one row per pair with the prompt computed once; or auto, prefix_shared where the "
        "model can confine attention as it needs and padded elsewhere (the fastest measured on CPU). All give the "
        "same numbers up to float rounding; models that cannot confine attention as a layout needs use padded.",
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


class SamplesConfig(Section):
    """Completions of a few held-out prompts sampled while training, logged to samples.jsonl and the trackers."""

    num_prompts: int = Field(8, ge=1, le=4096, description="The first this many held-out prompts (a task's own, "
                             "where it has them), the same ones at every sampling.")
    per_prompt: int = Field(1, ge=1, le=64, description="Completions sampled per prompt.")
    every: Optional[int] = Field(None, ge=1, description="Optimizer steps between samplings; none: train.eval_every. "
                                 "Also before the first step (with eval.at_start) and at the end.")
    sampler: PluginSpec = Field(..., description="Sampler plugin: {name: <a registered sampler>, max_new_tokens, "
                                "temperature, ...}; `prefopt list` shows them.")
    judge: Optional[PluginSpec] = Field(None, description="A judge plugin that scores each completion: {name: ..., "
                                        "<its options>}. A task's own score is logged too, when it has one.")


# A named eval set's metrics are logged as eval/<name>/<metric>: a name is one path segment, and not the first
# segment of another eval metric's key (eval/rewards/accuracies, eval/loss/<a loss's metric>, eval/samples/...).
EVAL_SET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
RESERVED_EVAL_SET_NAMES = ("loss", "rewards", "logps", "logits", "entropy", "samples")
_DataFormat = DataConfig.model_fields["format"].annotation


class EvalSetConfig(Section):
    """One named eval set: pairs read and tokenized as the held-out split is (data.max_length, data.append_eos,
    data.invalid_rows...), scored with its own reference and logged as eval/<name>/<metric>."""

    path: str = Field(..., description="Hub dataset id, local directory, file or glob.")
    split: str = Field(..., description="The split to score; a file or a glob of files is split train.")
    subset: Optional[str] = Field(None, description="Hub dataset configuration name.")
    columns: Optional[ColumnsConfig] = Field(None, description="Which columns hold what; none: data.columns.")
    format: Optional[_DataFormat] = Field(None, description="Row format; none: data.format.")
    max_pairs: Optional[int] = Field(None, ge=1, description="Use only the first N pairs.")


class EarlyStoppingConfig(Section):
    """End the run when ``metric`` has not improved by more than ``min_delta`` for ``patience`` evaluations in a row
    (checked every train.eval_every steps); it then finishes like a run that reached its last step."""

    metric: str = Field("eval/loss", description="Any key the run logs: eval/loss, eval/rewards/accuracies, "
                        "eval/<set>/loss, ... (the value at each evaluation).")
    mode: Literal["min", "max"] = Field("min", description="min: lower is better (a loss); max: higher (accuracy).")
    patience: int = Field(3, ge=1, description="Evaluations in a row without improvement before the run stops.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")


class EvalConfig(Section):
    at_start: bool = Field(True, description="Evaluate before the first step, for a baseline.")
    batch_size: int = Field(8, ge=1, description="Pairs per forward during held-out evaluation.")
    task_metrics: bool = Field(True, description="Also run the task's own evaluator (e.g. sampled rewards).")
    samples: Optional[SamplesConfig] = Field(None, description="Sample completions of held-out prompts while "
                                             "training: {num_prompts, per_prompt, every, sampler, judge}.")
    sets: dict[str, EvalSetConfig] = Field(
        default_factory=dict,
        description="Named eval sets, scored beside data.eval_split at every evaluation: {name: {path, split, "
        "subset, columns, format, max_pairs}}; each logs eval/<name>/loss, eval/<name>/rewards/accuracies, ...",
    )
    early_stopping: Optional[EarlyStoppingConfig] = Field(
        None, description="{metric: eval/loss, mode: min|max, patience: 3, min_delta: 0.0}: stop when the metric "
        "stops improving; needs train.eval_every and held-out pairs (data.eval_split, eval.sets or a task).",
    )

    @field_validator("sets")
    @classmethod
    def _set_names(cls, sets: dict[str, EvalSetConfig]) -> dict[str, EvalSetConfig]:
        for name in sets:
            if not EVAL_SET_NAME.fullmatch(name):
                raise ValueError(f"set name {name!r} becomes part of metric keys (eval/<name>/loss): use letters, "
                                 "digits, '_', '-' and '.'")
            if name in RESERVED_EVAL_SET_NAMES:
                raise ValueError(f"set name {name!r} would mix its metrics with the held-out split's "
                                 f"(eval/{name}/...); choose another name")
        return sets


def check_eval_needs(recipe) -> None:
    """What ``eval`` asks of the other sections: early stopping checks its metric at each evaluation, so it needs
    evaluations (train.eval_every) and pairs to evaluate."""
    stopping = recipe.eval.early_stopping
    if stopping is None:
        return
    if recipe.train.eval_every is None:
        raise PrefoptError(f"eval.early_stopping checks {stopping.metric} at each evaluation, and there is none "
                           "during training: set train.eval_every (optimizer steps between evaluations)")
    if recipe.data.eval_split is None and recipe.data.task is None and not recipe.eval.sets:
        raise PrefoptError("eval.early_stopping needs held-out pairs to evaluate: set data.eval_split or add an "
                           "eval set (eval.sets)")


def check_loss_needs(recipe, loss) -> None:
    """What the recipe's loss (a built ``PreferenceLoss``) rules out in the other sections, every problem at once.

    A loss that declares ``scores_sequences`` trains a reward model: a scorer with one output per sequence, which
    cannot generate, has no reference and is read at each sequence's last token, as the ``reward_model`` judge
    reads it.
    """
    if not getattr(loss, "scores_sequences", False):
        return
    problems = _reward_model_problems(recipe, loss.name)
    if len(problems) == 1:
        raise PrefoptError(problems[0])
    if problems:
        raise PrefoptError(f"loss {loss.name!r} trains a reward model: {len(problems)} problems"
                           + "".join(f"\n  {p}" for p in problems))


def _reward_model_problems(recipe, loss_name: str) -> list[str]:
    """One line per setting a reward model (loss ``loss_name``) cannot honour, naming the key and the fix."""
    what = f"loss {loss_name!r} trains a reward model"
    problems = []
    if recipe.train.layout not in ("padded", "auto"):  # auto scores a reward model padded
        problems.append(f"train.layout={recipe.train.layout}: {what}, whose forward reads one score per sequence in "
                        "the padded layout; set train.layout=padded")
    if recipe.data.append_eos:
        problems.append(f"data.append_eos=true: {what}, scored on prompt + response as written (the sequence the "
                        "reward_model judge scores), and an appended EOS would move the score to a token the judge "
                        "never sees; set data.append_eos=false")
    if recipe.eval.samples is not None:
        problems.append(f"eval.samples: {what}, which cannot sample completions; remove eval.samples")
    if recipe.data.task is not None and recipe.eval.task_metrics:
        problems.append(f"eval.task_metrics=true: the task's evaluator samples completions from the model, and {what}, "
                        "which cannot; set eval.task_metrics=false (held-out pairs still give eval/rewards/accuracies)")
    if recipe.algorithm is not None:
        problems.append(f"algorithm: {what}, which no algorithm can sample from or hold to a reference; remove the "
                        "algorithm section (the engine trains it in one pass)")
    if recipe.model.adapter is not None:
        problems.append(f"model.adapter: {what} with a fresh score head, which an existing adapter does not train; "
                        "merge the adapter into its base model, give that as model.path, and set model.lora or "
                        "model.peft for a fresh adapter")
    if recipe.model.quantization is not None:
        problems.append(f"model.quantization: {what}, and quantized reward models are not supported; remove "
                        "model.quantization (model.lora keeps the memory small)")
    return problems


class PushToHubConfig(Section):
    """Upload the saved model folder (with its model card) to the Hugging Face Hub when the run ends."""

    repo_id: str = Field(..., description="The hub repository, owner/name; created when it does not exist.")
    private: bool = Field(False, description="Create the repository private (an existing one keeps its setting).")
    revision: Optional[str] = Field(None, description="Branch to push to, created from main when missing; none: "
                                    "main.")
    token_env: Optional[str] = Field(
        None, description="Environment variable holding a write token; none: HF_TOKEN, else the saved hub login."
    )

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        from prefopt.publish.hub import check_repo_id

        check_repo_id(value)
        return value


class OutputConfig(Section):
    dir: str = Field("runs/prefopt", description="Run directory: checkpoints, metrics, the final model.")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: continue from the newest checkpoint in dir when there is one."
    )
    save_model: bool = Field(True, description="Write the final model in Hugging Face format with its tokenizer.")
    merge_lora: bool = Field(True, description="Merge a LoRA adapter into the saved model (else save the adapter).")
    trackers: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"tensorboard": {}},
        description="Trackers to log to: any of accelerate's (tensorboard, wandb, mlflow, comet_ml, aim, clearml, "
        "dvclive, swanlab, trackio), as a list of names or a mapping of names to their options, e.g. {wandb: "
        "{project: x}}. TensorBoard without options is skipped, with a notice, when it is not installed.",
    )
    push_to_hub: Optional[PushToHubConfig] = Field(
        None, description="{repo_id: owner/name, private, revision, token_env}: upload the saved model at the end."
    )

    # prefopt.engine.trackers is imported here, not at the top: the engine package imports the recipe package.
    @field_validator("trackers", mode="before")
    @classmethod
    def _mapping_form(cls, value: Any) -> Any:
        from prefopt.engine.trackers import normalize_trackers

        return normalize_trackers(value)

    @field_validator("trackers")
    @classmethod
    def _known_trackers(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from prefopt.engine.trackers import check_trackers

        check_trackers(value)
        return value

    @model_validator(mode="after")
    def _push_needs_the_model(self) -> "OutputConfig":
        if self.push_to_hub is not None and not self.save_model:
            raise ValueError("push_to_hub uploads the saved model; set output.save_model: true")
        return self


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
