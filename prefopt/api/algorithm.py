"""The algorithm contract: a plugin that drives training through the engine, in one run or in several.

Without an ``algorithm`` section a recipe is one pass of the engine (``prefopt.engine.train``). An
algorithm plugin orchestrates more, always through the engine's public functions on recipes it derives
from the user's (``prefopt.recipe.derive_recipe``):

- **Several runs** (stepwise DPO: one run per stage, each held to the previous stage's model): ``run``
  calls ``prefopt.engine.train(recipe, plugins, phase=...)`` once per stage.
- **One run it steers** (online DPO, SAPO: the pairs change while training): ``run`` hands the engine a
  ``Phase``, an object that says how the run is set up and what happens around each optimizer step, and
  the engine calls it. A phase never assigns fields of the engine's run: it reads and acts through the
  ``PhaseContext`` it is handed, and whatever it must keep across a crash it returns from
  ``checkpoint_state`` and gets back in ``restore``.

The engine calls a phase in this order: ``setup`` reads its options (``select_train``, ``data_model``,
``reference_follows_policy``, ``pairs_from_prompts``, ``plans_own_steps``) while it builds the run; once
the run is built (and a checkpoint loaded, if it resumes) ``start(ctx)``, then ``restore(extra,
load_tensors)`` if it resumes, then ``total_steps(ctx)`` and ``steps_per_epoch(ctx)`` if the phase plans its
own steps. Every optimizer step ``step`` (0-based) is ``before_step(ctx, step)`` -> ``pairs_of_step(step)``
-> the step -> ``after_step(ctx, step)``; every checkpoint stores ``checkpoint_state()``. ``close()`` runs
when the run ends, whether it finished or failed.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from prefopt.api.plugin import Plugin, PluginConfig
from prefopt.errors import PrefoptError

if TYPE_CHECKING:
    import torch

    from prefopt.data.types import TokenizedPairs

__all__ = [
    "Algorithm", "AlgorithmConfig", "Phase", "PhaseContext", "PluginSpec", "check_on_policy_recipe",
    "check_on_policy_run", "plugin_config",
]

#: Names of checkpoint files the engine writes itself, so no tensor set of a phase may take them.
RESERVED_TENSOR_SETS = frozenset({"trainable", "rng", "reference"})


class AlgorithmConfig(PluginConfig):
    """Base of every algorithm's options (recipe section ``algorithm``). Unknown keys are errors."""


class Algorithm(Plugin):
    """Base class of algorithm plugins. Subclasses set ``name`` (the recipe's ``algorithm.name``),
    ``Config``, ``paper`` and a docstring whose first line is the summary ``prefopt list`` shows."""

    Config: ClassVar[type[AlgorithmConfig]]
    # True for an algorithm that reads only the training data's prompts and makes every pair it trains on
    # (samples and judges responses): ``data.format: prompt_only`` passes validation, and the phase its
    # ``run`` hands the engine must say ``pairs_from_prompts = True``, or the engine refuses prompt-only data.
    pairs_from_prompts: ClassVar[bool] = False

    def __init__(self, config: AlgorithmConfig) -> None:
        self.config = config

    def check(self, recipe: Any, plugins: Any = None) -> None:
        """Refuse recipe settings this algorithm cannot honour (raise ``PrefoptError``); called when a recipe
        is validated, so ``prefopt validate`` reports them. ``plugins`` (added in 0.3; an override may leave
        it out) are the registries the recipe was validated against."""

    @abc.abstractmethod
    def run(self, recipe: Any, plugins: Any, *, show_progress: bool = True) -> dict:
        """Train as the recipe says; return the run summary (also written to ``<output.dir>/summary.json``).
        ``recipe`` still holds this algorithm's section: derive the recipe of each engine run from it
        without that section (``derive_recipe(recipe, plugins, {"algorithm": None}, source)``)."""


class PhaseContext:
    """What a phase's hooks see of the run the engine built, and the few things they may change in it.

    The engine makes one per run and passes it to the ``Phase`` hooks that take ``ctx``; plugins never
    construct it. Everything is read-only except through the methods that
    say they change something: ``replace_train_pairs``, ``sync_reference``, ``set_reference`` (and the
    ``summary`` dict, which a phase may add keys to).
    """

    def __init__(self, run: Any) -> None:
        self._run = run  # the engine's run; read through the documented members below only

    # --- what was built

    @property
    def recipe(self) -> Any:
        """This run's recipe (validated; no ``algorithm`` section)."""
        return self._run.recipe

    @property
    def accelerator(self) -> Any:
        """The run's ``accelerate.Accelerator`` (processes, device, collective calls)."""
        return self._run.accelerator

    @property
    def device(self) -> Any:
        return self._run.accelerator.device

    @property
    def is_main(self) -> bool:
        """Whether this is the main process (the one that samples, judges and writes shared files)."""
        return self._run.is_main

    @property
    def num_processes(self) -> int:
        return self._run.accelerator.num_processes

    @property
    def policy(self) -> torch.nn.Module:
        """The policy as it trains (wrapped for distribution, e.g. in DDP)."""
        return self._run.policy

    @property
    def model(self) -> torch.nn.Module:
        """The policy unwrapped from any distributed wrapper: a transformers causal LM (a PEFT model under
        LoRA), what a sampler reads its weights from."""
        return self._run.accelerator.unwrap_model(self._run.policy)

    @property
    def tokenizer(self) -> Any:
        return self._run.tokenizer

    @property
    def loss(self) -> Any:
        """The loss plugin (read what it declares: ``requires_reference``, ``unpaired``, ...)."""
        return self._run.loss

    @property
    def sharded(self) -> bool:
        """Whether each process holds only a shard of the weights (FSDP, ZeRO-3): no process has the whole
        model to sample from."""
        from prefopt.engine.distributed import sharded_params  # the engine imports this module

        return sharded_params(self._run.accelerator)

    @property
    def start_step(self) -> int:
        """Optimizer steps already done: 0 for a fresh run, the checkpoint's step for a resumed one."""
        return self._run.start_step

    @property
    def total_steps(self) -> int:
        """Optimizer steps the run takes (set once ``Phase.total_steps`` has been asked, if it plans them)."""
        return self._run.total_steps

    @property
    def summary(self) -> dict:
        """The run summary, written to ``summary.json`` at the end; a phase may add its own keys."""
        return self._run.summary

    def say(self, message: str) -> None:
        """Print a line on the main process (above the progress bar)."""
        self._run.say(message)

    # --- the training pairs

    @property
    def train_pairs(self) -> TokenizedPairs:
        """The pairs the next optimizer steps draw from: the indices ``pairs_of_step`` returns point into them."""
        return self._run.train_pairs

    @property
    def train_rows(self) -> Any:
        """The source rows (a ``datasets.Dataset``) that the training pairs' ``row`` numbers index, as read."""
        return self._run.train_rows

    def replace_train_pairs(self, pairs: TokenizedPairs) -> None:
        """Train on ``pairs`` from the next step on (e.g. the pairs a round sampled and judged). Call it from
        ``start`` or ``before_step``, before the step that uses them; every process must pass the same pairs."""
        self._run.train_pairs = pairs

    # --- a reference that follows the policy (``Phase.reference_follows_policy``)

    @property
    def follows_policy(self) -> bool:
        """Whether the run's reference is one the phase moves (``reference_follows_policy`` and a loss that
        uses a reference); False for a reference-free loss."""
        return self._following() is not None

    def sync_reference(self, alpha: float = 1.0) -> None:
        """reference <- alpha * policy + (1 - alpha) * reference; ``alpha = 1`` copies the policy exactly."""
        self._require_following().sync(alpha)

    def set_reference(self, weights: dict[str, torch.Tensor]) -> None:
        """The reference takes ``weights`` (the policy's trainable tensors by name, e.g. an EMA of them)."""
        self._require_following().weights.load_state_dict(weights)

    def _following(self):
        reference = self._run.reference
        return reference.following if reference is not None else None

    def _require_following(self):
        following = self._following()
        if following is None:
            raise RuntimeError("this run has no reference that follows the policy: set the phase's "
                               "reference_follows_policy, and check follows_policy (False without a reference)")
        return following

    # --- evaluation

    def evaluate_task(self) -> dict[str, float]:
        """The task's own evaluator on the policy now (``eval/...`` metrics; empty without a task or with
        ``eval.task_metrics: false``). Every process must call it."""
        from prefopt.engine.evaluation import evaluate_task  # the engine imports this module

        return evaluate_task(self._run)


@dataclass
class Phase:
    """What an algorithm changes in one engine run: how it is set up, and what happens around each step.

    The defaults are a plain run, so a phase overrides only what it changes. Pass one to
    ``prefopt.engine.train(recipe, plugins, phase=...)`` (or ``setup``); the order of the calls is in this
    module's docstring. Setup options (read once, while the run is built):

    - ``select_train(pairs, rows)``: the training pairs of this run, chosen from all of them (``rows`` are
      the source rows their ``row`` numbers index), e.g. one stage of stepwise DPO. None keeps them all.
    - ``data_model``: the model a task builds its data with (default: the policy's initial model), so every
      run of an algorithm trains on the same data.
    - ``reference_follows_policy``: a loss that needs a reference gets one the phase moves itself
      (``ctx.sync_reference``, ``ctx.set_reference``) instead of a fixed one; it is checkpointed.
    - ``pairs_from_prompts``: the phase makes every pair it trains on from the data's prompts, so
      prompt-only data is accepted; the pairs then hold empty responses, which the phase must replace
      (``ctx.replace_train_pairs``) before the first step.
    - ``plans_own_steps``: the phase says how many steps the run takes (``total_steps``) and, usually,
      which pairs each takes (``pairs_of_step``); the data's epoch arithmetic is then not printed.
    """

    select_train: Callable[[TokenizedPairs, Any], TokenizedPairs] | None = None
    data_model: str | None = None
    reference_follows_policy: bool = False
    pairs_from_prompts: bool = False
    plans_own_steps: bool = False

    def start(self, ctx: PhaseContext) -> None:
        """Once the run is built (a checkpoint it resumes from already loaded into the policy, optimizer and
        a following reference), before ``restore`` and the first step: build what the phase keeps."""

    def restore(self, extra: dict, load_tensors: Callable[[str], dict[str, torch.Tensor]]) -> None:
        """A resumed run: ``extra`` is what ``checkpoint_state`` returned when the checkpoint was written, and
        ``load_tensors(name)`` reads back one of its tensor sets. Put the phase back exactly as it was."""

    def total_steps(self, ctx: PhaseContext) -> int:
        """With ``plans_own_steps``: how many optimizer steps the run takes (``train.max_steps`` still caps
        it). Asked once, after ``start`` and ``restore``."""
        # A contract error of the plugin, not of the user's recipe: one line naming the phase class.
        raise PrefoptError(f"{type(self).__module__}.{type(self).__qualname__} sets plans_own_steps but does not "
                           "define total_steps(ctx); a phase that plans its own steps must say how many")

    def steps_per_epoch(self, ctx: PhaseContext) -> int | None:
        """With ``plans_own_steps``: the steps the logged ``epoch`` counts as one (e.g. one round); None
        keeps the data's (pairs // train.batch_size)."""
        return None

    def pairs_of_step(self, step: int) -> list[int] | None:
        """The indices into ``ctx.train_pairs`` that optimizer step ``step`` trains on (``train.batch_size``
        of them, the same on every process); None: the engine's seeded order, a new permutation each epoch."""
        return None

    def before_step(self, ctx: PhaseContext, step: int) -> dict[str, float]:
        """Work before step ``step`` (sample a round, draw a batch); returns metrics, logged at ``step`` and
        measured again by a run that resumes at ``step``."""
        return {}

    def after_step(self, ctx: PhaseContext, step: int) -> None:
        """Work after step ``step``'s optimizer update (an EMA update)."""

    def checkpoint_state(self) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
        """What a checkpoint must hold to resume this phase exactly: (JSON-able ``extra``, named tensor sets,
        each written as ``<name>.safetensors``; names other than ``trainable``, ``rng`` and ``reference``)."""
        return {}, {}

    def close(self) -> None:
        """Free what the phase holds (a sampler's engine); called when the run ends, however it ends."""


# What every algorithm that trains on pairs it makes itself (sampled from the policy or a copy of it) checks.


def check_on_policy_recipe(name: str, recipe: Any) -> None:
    """Refuse reference settings an algorithm that makes its own pairs cannot honour: it sets the reference
    itself, and a cache cannot hold completions that do not exist yet. Call it from ``Algorithm.check``."""
    if recipe.reference.sync is not None or recipe.reference.extra:
        raise PrefoptError(f"algorithm {name} sets the reference itself; remove reference.sync and reference.extra")
    if recipe.reference.kind == "cache":
        raise PrefoptError(f"algorithm {name} trains on new completions as it goes, which a reference cache cannot "
                           "hold; set reference.kind to auto or live")


def check_on_policy_run(name: str, ctx: PhaseContext) -> None:
    """Refuse losses and launches such an algorithm cannot train: it makes pairs for a single reference, and
    samples from the whole model on one process. Call it from ``Phase.start``."""
    if ctx.loss.unpaired or ctx.loss.multi_reference:
        raise PrefoptError(f"algorithm {name} trains paired, single-reference losses; loss {ctx.loss.name!r} is not "
                           "one")
    if ctx.sharded:
        raise PrefoptError(f"algorithm {name} samples from the whole model on one process, which FSDP or ZeRO-3 do "
                           "not hold; train with DDP or on one process")


class PluginSpec(BaseModel):
    """A plugin an algorithm uses, by name, with its options (e.g. ``algorithm.sampler: {name: vllm, ...}``);
    the options are checked against that plugin's own Config by ``plugin_config``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k != "name"}


def plugin_config(registry: Any, spec: PluginSpec, key: str) -> tuple[type, BaseModel]:
    """The plugin class ``spec`` names in ``registry`` and its validated Config; bad options are a one-line
    error naming each recipe key (``key`` is where the spec sits, e.g. ``algorithm.sampler``)."""
    # Imported here: prefopt.recipe loads the plugin registry, which imports this module.
    from prefopt.recipe.problems import format_problems

    cls = registry.get(spec.name)
    try:
        return cls, cls.Config.model_validate(spec.options())
    except ValidationError as exc:
        problems = format_problems(exc, where=key, model=cls.Config, owner=f"{registry.kind} {spec.name!r}")
        raise PrefoptError("; ".join(problems)) from None
