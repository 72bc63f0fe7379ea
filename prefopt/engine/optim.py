"""The optimizer and the learning-rate schedule a recipe names: ``train.optimizer`` and ``train.lr_scheduler``.

``train.optimizer`` is any ``torch.optim`` class by name (default AdamW), with its options beside the name:
``{name: SGD, momentum: 0.9}``. The learning rate is always ``train.learning_rate``, the weight decay
``train.weight_decay``, and an optimizer of the Adam family (one that takes ``betas``) gets its betas and eps
from ``train.adam_beta1``, ``train.adam_beta2`` and ``train.adam_eps``: one key per setting, whichever
optimizer is chosen.

``train.lr_scheduler`` is a schedule of transformers' ``get_scheduler`` by name, with its options beside the
name: ``{name: cosine_with_min_lr, min_lr_rate: 0.1}``; every schedule warms up over ``train.warmup_steps``.
The rate of step N is a pure function of N (the schedule's factor, read at N), never a count kept by a
scheduler object, so a resumed run continues the schedule exactly without saving any of it.

The recipe checks names and options when it is validated (``check_optimizer``, ``check_schedule``), so
``prefopt validate`` reports a misspelt optimizer or option before anything loads.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from typing import Any, Callable

import torch

from prefopt.errors import PrefoptError, did_you_mean

# Options the engine sets from train keys, so that a setting has one key whatever the optimizer.
OPTIMIZER_KEYS = {
    "lr": "train.learning_rate",
    "betas": "train.adam_beta1 and train.adam_beta2",
    "eps": "train.adam_eps",
    "weight_decay": "train.weight_decay",
}
# torch.optim classes the loop cannot drive, and why.
UNSUPPORTED_OPTIMIZERS = {
    "LBFGS": "its step() needs a closure that reruns the forward, which the training loop does not give",
    "SparseAdam": "it takes sparse gradients only, and a model's gradients are dense",
}

# prefopt's schedule names -> transformers' SchedulerType values. prefopt's constant warms up over
# train.warmup_steps like every other schedule, which is transformers' constant_with_warmup.
SCHEDULES = {
    "constant": "constant_with_warmup",
    "linear": "linear",
    "cosine": "cosine",
    "cosine_with_restarts": "cosine_with_restarts",
    "cosine_with_min_lr": "cosine_with_min_lr",
    "polynomial": "polynomial",
    "inverse_sqrt": "inverse_sqrt",
    "warmup_stable_decay": "warmup_stable_decay",
}
UNSUPPORTED_SCHEDULES = {
    "constant_with_warmup": "use constant, which warms up over train.warmup_steps",
    "cosine_warmup_with_min_lr": "use cosine_with_min_lr: prefopt's warmup already starts at 1 / warmup_steps",
    "reduce_lr_on_plateau": "it follows a metric, so the rate would not be a function of the step, which resume needs",
    "greedy": "it follows a metric, so the rate would not be a function of the step, which resume needs",
}
# Schedules that need one of two options, both optional in transformers' signature.
SCHEDULE_NEEDS_ONE_OF = {"cosine_with_min_lr": ("min_lr_rate", "min_lr")}
# Arguments of transformers' schedule functions that the engine passes itself.
_SCHEDULE_ARGUMENTS = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}


# ----------------------------------------------------------------------------------------------------------
# the optimizer


def build_optimizer(recipe, params) -> torch.optim.Optimizer:
    """The recipe's ``train.optimizer`` over ``params`` (the policy's trainable parameters)."""
    t = recipe.train
    cls = getattr(torch.optim, t.optimizer.name)
    return cls(list(params), **optimizer_kwargs(cls, t.optimizer.options, t))


def optimizer_kwargs(cls: type, options: dict[str, Any], train) -> dict[str, Any]:
    """What ``cls`` is built with: the rate, decay (and Adam's betas and eps) from ``train``, then ``options``.
    ``train`` is the train section, or a mapping of its values (while the recipe is being validated)."""
    value = train.get if isinstance(train, dict) else functools.partial(getattr, train)
    accepted = _accepted_options(cls)
    kwargs: dict[str, Any] = {"lr": value("learning_rate")}
    if "betas" in accepted:  # the Adam family
        kwargs.update(betas=(value("adam_beta1"), value("adam_beta2")), eps=value("adam_eps"))
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = value("weight_decay")
    # YAML has no tuples; torch's own defaults for these options are tuples (betas, etas, step_sizes).
    kwargs.update({k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    return kwargs


def check_optimizer(name: str, options: dict[str, Any], train: dict[str, Any]) -> None:
    """Raise ValueError naming what is wrong with ``train.optimizer``: an unknown class (with a did-you-mean),
    an option the class does not take (with the ones it does), or values the class refuses. ``train`` holds
    the train section's values validated so far."""
    classes = optimizer_names()
    if name not in classes:
        reason = UNSUPPORTED_OPTIMIZERS.get(name)
        if reason:
            raise ValueError(f"optimizer {name!r} cannot train here: {reason}")
        raise ValueError(f"unknown optimizer {name!r}{_suggest(name, classes)}; torch.optim has "
                         f"{', '.join(classes)}")
    cls = getattr(torch.optim, name)
    accepted = _accepted_options(cls)
    # eps is train.adam_eps for the Adam family only; other optimizers (Adagrad, RMSprop) take it here.
    set_by_train = [k for k in OPTIMIZER_KEYS if k != "eps" or "betas" in accepted]
    free = [option for option in accepted if option not in set_by_train]
    for option in options:
        if option in set_by_train:
            raise ValueError(f"option {option!r} of optimizer {name!r} is set by {OPTIMIZER_KEYS[option]}")
        if option not in accepted:
            raise ValueError(f"unknown option {option!r} of optimizer {name!r}{did_you_mean(option, free)}; "
                             f"{name} takes {', '.join(free) or 'no options'}")
    if train.get("weight_decay") and "weight_decay" not in accepted:
        raise ValueError(f"optimizer {name!r} takes no weight decay; set train.weight_decay to 0")
    if any(key not in train for key in ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps")):
        return  # one of them is wrong itself, and reported on its own
    try:  # the class's own checks of the values, on a stand-in parameter
        cls([torch.zeros(2, 2, requires_grad=True)], **optimizer_kwargs(cls, options, train))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"optimizer {name!r} refuses these options: {_first_line(exc)}") from None


def optimizer_names() -> list[str]:
    """The torch.optim classes a recipe can name."""
    names = []
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
            names.append(name)
    return sorted((n for n in names if n not in UNSUPPORTED_OPTIMIZERS), key=str.lower)


def _accepted_options(cls: type) -> list[str]:
    parameters = inspect.signature(cls.__init__).parameters
    return [p for p in parameters if p not in ("self", "params")]


# ----------------------------------------------------------------------------------------------------------
# the schedule


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each optimizer step: ``base_lr`` times transformers' schedule factor."""

    base_lr: float
    warmup_steps: int
    factor: Callable[[int], float]  # transformers' lr_lambda: step -> multiple of base_lr

    def __call__(self, step: int) -> float:
        # prefopt's warmup gives 0-based step `step` the rate (step + 1) / warmup_steps, so that the first step
        # already trains and the last warmup step has the full rate; transformers' gives step / warmup_steps, 0 at
        # step 0. After warmup both measure the decay from step warmup_steps. So during warmup the factor is read
        # one step ahead, except at the last warmup step: one step ahead is already the decay there, which a run
        # no longer than its warmup would read at its end (0 for linear) instead of the full rate.
        if step < self.warmup_steps - 1:
            return self.base_lr * self.factor(step + 1)
        if step == self.warmup_steps - 1:
            return self.base_lr
        return self.base_lr * self.factor(step)


def build_schedule(recipe, total_steps: int) -> Schedule:
    """The recipe's ``train.lr_scheduler`` over a run of ``total_steps`` optimizer steps."""
    t = recipe.train
    s = t.lr_scheduler
    # Without num_stable_steps, the stable phase is what warmup and decay leave of the run: it cannot be negative.
    if s.name == "warmup_stable_decay" and "num_stable_steps" not in s.options:
        if t.warmup_steps + s.options["num_decay_steps"] > total_steps:
            raise PrefoptError(
                f"train.lr_scheduler.num_decay_steps ({s.options['num_decay_steps']}) and train.warmup_steps "
                f"({t.warmup_steps}) add up to more than the run's {total_steps} optimizer steps; shorten them"
            )
    return _schedule(s.name, json.dumps(s.options, sort_keys=True), t.learning_rate, t.warmup_steps, total_steps)


def learning_rate_at(recipe, total_steps: int, step: int) -> float:
    """The learning rate of 0-based optimizer step ``step`` of a run of ``total_steps`` steps."""
    return build_schedule(recipe, total_steps)(step)


@functools.lru_cache(maxsize=16)  # built once per run, read every step
def _schedule(name: str, options: str, base_lr: float, warmup_steps: int, total_steps: int) -> Schedule:
    from transformers import get_scheduler

    # A stand-in optimizer, so the run's optimizer state is not touched (a scheduler adds keys to it). Its
    # rate is the run's: polynomial and cosine_with_min_lr turn absolute rates (lr_end, min_lr) into factors.
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = get_scheduler(SCHEDULES[name], stand_in, num_warmup_steps=warmup_steps,
                              num_training_steps=total_steps, scheduler_specific_kwargs=json.loads(options))
    return Schedule(base_lr, warmup_steps, scheduler.lr_lambdas[0])


def check_schedule(name: str, options: dict[str, Any], learning_rate: float | None) -> None:
    """Raise ValueError naming what is wrong with ``train.lr_scheduler``: an unknown schedule (with a
    did-you-mean), an option it does not take (with the ones it does), a required option missing, or values
    transformers refuses."""
    if name not in SCHEDULES:
        reason = UNSUPPORTED_SCHEDULES.get(name)
        if reason:
            raise ValueError(f"schedule {name!r} is not offered: {reason}")
        raise ValueError(f"unknown schedule {name!r}{did_you_mean(name, SCHEDULES)}; one of {', '.join(SCHEDULES)}")
    if not options and name in ("constant", "linear", "cosine"):
        return  # nothing to refuse, and validating needs no import of transformers' schedules (seconds: peft)
    parameters = _schedule_parameters(name)
    for option in options:
        if option in _SCHEDULE_ARGUMENTS:
            raise ValueError(f"option {option!r} of schedule {name!r} is set by the engine "
                             "(train.warmup_steps, and the run's number of steps)")
        if option not in parameters:
            raise ValueError(f"unknown option {option!r} of schedule {name!r}{did_you_mean(option, parameters)}; "
                             f"{name} takes {', '.join(parameters) or 'no options'}")
    missing = [p for p, param in parameters.items() if param.default is inspect.Parameter.empty and p not in options]
    either = SCHEDULE_NEEDS_ONE_OF.get(name, ())
    if either and not any(option in options for option in either):
        missing = [" or ".join(either)]
    if missing:
        raise ValueError(f"schedule {name!r} needs {', '.join(missing)}: write train.lr_scheduler as "
                         f"{{name: {name}, {missing[0].split(' ')[0]}: ...}}")
    if learning_rate is None:
        return  # train.learning_rate is wrong itself, and reported on its own
    try:  # transformers' own checks of the values; the number of steps is a stand-in
        _schedule(name, json.dumps(options, sort_keys=True), learning_rate, 0, 1000)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"schedule {name!r} refuses these options: {_first_line(exc)}") from None


def _schedule_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The options schedule ``name`` takes beside what the engine passes (transformers' function's arguments)."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(SCHEDULES[name])]
    parameters = inspect.signature(function).parameters
    return {p: param for p, param in parameters.items() if p not in _SCHEDULE_ARGUMENTS}


def _suggest(name: str, choices: list[str]) -> str:
    """A did-you-mean that also catches a difference of case only (adamw for AdamW)."""
    same = [c for c in choices if c.lower() == name.lower()]
    return f" (did you mean {same[0]!r}?)" if same else did_you_mean(name, choices)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
