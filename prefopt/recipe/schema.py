"""Recipes: YAML files validated against a schema assembled after plugins load.

The engine owns every section but two: ``loss`` is a union over every registered loss's ``Config``
(tagged by ``loss.name``), and ``data.task`` a union over every registered task's ``Config``. So a
plugin owns its options, their bounds and their docs, and a recipe can name any installed plugin.

``load_recipe`` reports every problem at once, each naming its dotted key, with a did-you-mean for
misspelt keys and names. Command-line overrides are dotted keys: ``loss.beta=0.2``.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from prefopt.errors import PrefoptError, RecipeError, did_you_mean
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


class TrainConfig(Section):
    epochs: int = Field(1, ge=1, description="Passes over the training pairs (unless max_steps ends sooner).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Pairs per optimizer step, over all processes.")
    micro_batch_size: int = Field(
        2, ge=1, description="Pairs per forward pass per process; accumulation makes up the rest."
    )
    learning_rate: float = Field(5e-6, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
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


def _tagged_union(registry: Registry, what: str) -> Any:
    """A pydantic union over every registered plugin's Config, tagged by its ``name`` field."""
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
    task_spec = _tagged_union(plugins.tasks, "task") if len(plugins.tasks) else Any
    algorithm_spec = _tagged_union(plugins.algorithms, "algorithm") if len(plugins.algorithms) else Any
    data_model = create_model("DataSection", __base__=DataConfig, task=(Optional[task_spec], None))
    return create_model(
        "Recipe",
        __config__=ConfigDict(extra="forbid", frozen=True),
        seed=(int, Field(0, description="Seeds data order, initialization and sampling.")),
        model=(ModelConfig, ModelConfig()),
        data=(data_model, ...),
        loss=(_tagged_union(plugins.losses, "loss"), ...),
        algorithm=(Optional[algorithm_spec], Field(
            None, description="Phases of training (e.g. {name: stepwise}); none: one pass of the engine.")),
        reference=(ReferenceConfig, ReferenceConfig()),
        train=(TrainConfig, TrainConfig()),
        eval=(EvalConfig, EvalConfig()),
        output=(OutputConfig, OutputConfig()),
    )


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML, overrides, validation with every error at once


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.learning_rate=1e-5' -> (['train', 'learning_rate'], 1e-05). Values are YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise PrefoptError(f"override {text!r} is not of the form dotted.key=value (e.g. loss.beta=0.2)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise PrefoptError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    # YAML reads '1e-5' as a string; numbers in scientific notation are common in recipes.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    return [k.strip() for k in key.split(".")], value


def apply_override(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            path = ".".join(keys[: i + 1])
            raise PrefoptError(f"override {'.'.join(keys)}: {path} is {child!r}, not a section")
        node = child
    node[keys[-1]] = value


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise PrefoptError(f"recipe {path} not found")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PrefoptError(f"recipe {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if tree is None:
        raise PrefoptError(f"recipe {path} is empty; start from recipes/dpo/quickstart.yaml")
    if not isinstance(tree, dict):
        raise PrefoptError(f"recipe {path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    return tree


def _fields_at(model: Any, loc: tuple) -> list[str]:
    """Field names of the (sub-)model that ``loc`` points into, for did-you-mean suggestions."""
    for key in loc:
        fields = getattr(model, "model_fields", None)
        if fields is None or key not in fields:
            return []
        model = fields[key].annotation
        # Optional[Section] and similar: the one model among the union's members.
        members = [a for a in typing.get_args(model) if hasattr(a, "model_fields")]
        if members:
            model = members[0]
    return list(getattr(model, "model_fields", None) or {})


def _describe(error: dict, schema: type[BaseModel], tree: dict, plugins: Plugins) -> str:
    loc = tuple(error["loc"])
    # Tagged unions put the tag in the location (loss.dpo.beta); the user wrote loss.beta.
    if len(loc) >= 2 and loc[0] == "loss" and loc[1] in plugins.losses:
        loc = (loc[0],) + loc[2:]
    if len(loc) >= 3 and loc[:2] == ("data", "task") and loc[2] in plugins.tasks:
        loc = loc[:2] + loc[3:]
    if len(loc) >= 2 and loc[0] == "algorithm" and loc[1] in plugins.algorithms:
        loc = (loc[0],) + loc[2:]
    path = ".".join(str(p) for p in loc) or "(recipe)"
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = loc[:-1]
        siblings = _fields_at(schema, parent)
        for section, registry in (("loss", plugins.losses), ("algorithm", plugins.algorithms)):
            if parent and parent[0] == section:
                name = (tree.get(section) or {}).get("name")
                if name in registry:
                    siblings = list(registry.get(name).Config.model_fields)
                    return f"{path}: unknown option of {section} {name!r}{did_you_mean(loc[-1], siblings)}"
        return f"{path}: unknown key{did_you_mean(loc[-1], siblings)}"
    if kind in ("union_tag_invalid", "literal_error") and loc[-1:] == ("name",) or kind == "union_tag_invalid":
        registry = _registry_at(loc, plugins)
        given = error.get("input")
        if isinstance(given, dict):
            given = given.get("name")
        return (
            f"{path if path.endswith('name') else path + '.name'}: unknown {registry.kind} {given!r}"
            f"{did_you_mean(str(given), registry.names())}; registered: {', '.join(registry.names())}"
        )
    if kind == "union_tag_not_found":
        registry = _registry_at(loc, plugins)
        return f"{path}.name: missing; choose one of {', '.join(registry.names())}"
    if kind == "missing":
        return f"{path}: required but missing"
    message = error["msg"]
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
        return f"{path}: {message}" if path != "data" else message
    given = error.get("input")
    return f"{path}: {message} (got {given!r})"


def _registry_at(loc: tuple, plugins: Plugins) -> Registry:
    if loc[:2] == ("data", "task"):
        return plugins.tasks
    return plugins.algorithms if loc[:1] == ("algorithm",) else plugins.losses


def validate_tree(tree: dict, plugins: Plugins, source: str) -> BaseModel:
    schema = recipe_model(plugins)
    try:
        recipe = schema.model_validate(tree)
    except ValidationError as exc:
        problems = [_describe(e, schema, tree, plugins) for e in exc.errors()]
        raise RecipeError(source, list(dict.fromkeys(problems))) from None
    try:
        build_loss(recipe, plugins)  # a loss may check more than its schema can (a mixture's components)
        if recipe.algorithm is not None:
            algorithm = build_algorithm(recipe, plugins)
            # ``plugins`` came with 0.3 (an algorithm that builds samplers and judges validates their options)
            if "plugins" in inspect.signature(algorithm.check).parameters:
                algorithm.check(recipe, plugins=plugins)
            else:
                algorithm.check(recipe)
    except PrefoptError as exc:
        raise RecipeError(source, [str(exc)]) from None
    return recipe


def build_loss(recipe: BaseModel, plugins: Plugins):
    """The recipe's loss plugin, constructed from its own Config (the recipe's copy also carries ``name``)."""
    loss_cls = plugins.losses.get(recipe.loss.name)
    return loss_cls(loss_cls.Config.model_validate(recipe.loss.model_dump(exclude={"name"})))


def build_algorithm(recipe: BaseModel, plugins: Plugins):
    """The recipe's algorithm plugin, or None for one pass of the engine."""
    if recipe.algorithm is None:
        return None
    cls = plugins.algorithms.get(recipe.algorithm.name)
    return cls(cls.Config.model_validate(recipe.algorithm.model_dump(exclude={"name"})))


def load_recipe(path: str | Path, overrides: list[str] = (), plugins: Plugins | None = None) -> BaseModel:
    """Read, override and validate a recipe; raise RecipeError listing every problem."""
    from prefopt.registry.loading import default_plugins

    plugins = plugins or default_plugins()
    path = Path(path)
    tree = read_yaml(path)
    for text in overrides:
        apply_override(tree, *parse_override(text))
    recipe = validate_tree(tree, plugins, str(path))
    # Here, not in validate_tree: an algorithm validates the recipes of its phases there with no algorithm
    # section, and those phases may read prompt-only data the algorithm accepted.
    try:
        algorithm = plugins.algorithms.get(recipe.algorithm.name) if recipe.algorithm is not None else None
        check_prompt_only_data(recipe, algorithm)
    except PrefoptError as exc:
        raise RecipeError(str(path), [str(exc)]) from None
    return recipe


def check_prompt_only_data(recipe: BaseModel, algorithm) -> None:
    """Refuse ``data.format: prompt_only`` unless the recipe's algorithm (its plugin class, or None) makes its
    own pairs from prompts (the engine refuses prompt-only rows that ``auto`` detects, when it reads them)."""
    if recipe.data.format != "prompt_only" or getattr(algorithm, "pairs_from_prompts", False):
        return
    runs = "this recipe trains on the data's responses" if algorithm is None else (
        f"algorithm {algorithm.name!r} trains on the data's responses")
    raise PrefoptError(
        f"data.format=prompt_only: prompt-only rows have no responses, and {runs}; use preference data "
        f"(prompt, chosen, rejected), or an algorithm that samples its own pairs from prompts (see `prefopt list`)"
    )


def dump_recipe(recipe: BaseModel) -> str:
    """The full recipe, defaults included, as YAML (saved next to every run)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
