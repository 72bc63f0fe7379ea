"""The optimizer and learning-rate schedule a recipe names (``train.optimizer``, ``train.lr_scheduler``): the
same rates and optimizer as before for today's recipes, the new schedules, resume, and the recipe's errors."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from helpers import one_line_error, validated
from prefopt.engine import optim
from prefopt.engine.optim import Schedule, build_optimizer, build_schedule, learning_rate_at
from prefopt.errors import PrefoptError, RecipeError


def _recipe(**train):
    return validated({"data": {"path": "pairs.jsonl"}, "loss": {"name": "dpo"}, "train": train})


def _hand_written(base: float, schedule: str, warmup: int, total: int, step: int) -> float:
    """The engine's learning rate before schedules came from transformers, verbatim."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return base


def _float32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


# ----------------------------------------------------------------------------------------------------------
# today's recipes: the same rates and the same optimizer


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 3])
@pytest.mark.parametrize("total", [1, 3, 10, 250])
def test_todays_schedules_give_the_hand_written_rates_step_for_step(schedule, warmup, total):
    """Step for step the same rate, to float64 rounding. transformers computes base * (s / warmup) and
    (total - s) / (total - warmup) where the old code computed (base * (step + 1)) / warmup and
    1 - (step - warmup) / (total - warmup): the same numbers, rounded in another order, so they may differ
    in the last bits of a float64 (relative 1e-13 at most here). A rate reaches the parameters in float32,
    where they are identical; cosine and constant after warmup round the same way and are equal exactly."""
    recipe, base = _recipe(learning_rate=5e-4, lr_scheduler=schedule, warmup_steps=warmup), 5e-4
    for step in range(total):
        rate, expected = learning_rate_at(recipe, total, step), _hand_written(base, schedule, warmup, total, step)
        assert rate == pytest.approx(expected, rel=1e-13, abs=0), step
        assert _float32(rate) == _float32(expected), step
        if schedule != "linear" and step >= warmup:
            assert rate == expected, step
        if step == warmup - 1:
            assert rate == base  # the last warmup step has the full rate, also when the run ends there


@pytest.mark.parametrize("schedule,warmup", [("linear", 3), ("cosine", 2), ("constant", 5), ("linear", 0)])
def test_an_optimizer_cannot_tell_the_new_rates_from_the_old(schedule, warmup):
    """40 AdamW steps on fixed weights and gradients end in bitwise the same weights under either."""
    total, base = 40, 5e-4
    recipe = _recipe(learning_rate=base, lr_scheduler=schedule, warmup_steps=warmup, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(32, 32, generator=generator)
    gradients = [torch.randn(32, 32, generator=generator) for _ in range(total)]
    finals = []
    def hand_written(step: int) -> float:
        return _hand_written(base, schedule, warmup, total, step)

    for rate in (hand_written, lambda step: learning_rate_at(recipe, total, step)):
        weights = torch.nn.Parameter(start.clone())
        optimizer = torch.optim.AdamW([weights], lr=base, weight_decay=0.01)
        for step in range(total):
            for group in optimizer.param_groups:
                group["lr"] = rate(step)
            weights.grad = gradients[step].clone()
            optimizer.step()
        finals.append(weights.detach())
    assert torch.equal(finals[0], finals[1])


def test_the_default_optimizer_is_adamw_from_the_adam_keys():
    recipe = _recipe(learning_rate=1e-4, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6, weight_decay=0.1)
    built = build_optimizer(recipe, [torch.nn.Parameter(torch.zeros(2))])
    before = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-4, betas=(0.8, 0.95), eps=1e-6,
                               weight_decay=0.1)
    assert type(built) is torch.optim.AdamW and built.defaults == before.defaults


def test_any_torch_optimizer_by_name_with_its_options():
    recipe = _recipe(learning_rate=0.1, weight_decay=0.01, optimizer={"name": "SGD", "momentum": 0.9, "nesterov": True})
    sgd = build_optimizer(recipe, [torch.nn.Parameter(torch.zeros(2))])
    assert type(sgd) is torch.optim.SGD
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["nesterov"], sgd.defaults["weight_decay"]) == (
        0.1, 0.9, True, 0.01)
    # eps is train.adam_eps for the Adam family only; Adagrad takes its own
    adagrad = build_optimizer(_recipe(optimizer={"name": "Adagrad", "eps": 1e-6}), [torch.nn.Parameter(torch.zeros(2))])
    assert adagrad.defaults["eps"] == 1e-6


# ----------------------------------------------------------------------------------------------------------
# the new schedules, and resume


def test_cosine_with_min_lr_decays_to_its_floor():
    base, total = 1e-3, 20
    schedule = {"name": "cosine_with_min_lr", "min_lr_rate": 0.1}
    recipe = _recipe(learning_rate=base, warmup_steps=2, lr_scheduler=schedule)
    rates = [learning_rate_at(recipe, total, step) for step in range(total)]
    assert rates[:3] == [base / 2, base, base]  # warmup, then the decay starts from the full rate
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))
    assert 0.1 * base < rates[-1] < 0.11 * base  # the floor is reached after the run's last step


def test_warmup_stable_decay_holds_the_rate_then_decays_over_its_last_steps():
    base, total = 1e-3, 20
    schedule = {"name": "warmup_stable_decay", "num_decay_steps": 5, "min_lr_ratio": 0.2, "decay_type": "linear"}
    recipe = _recipe(learning_rate=base, warmup_steps=3, lr_scheduler=schedule)
    rates = [learning_rate_at(recipe, total, step) for step in range(total)]
    # warmup rises from 0.2 of the rate too, and the last warmup step is at the full rate
    assert rates[:3] == pytest.approx([base * (0.2 + 0.8 * (k + 1) / 3) for k in range(3)])
    assert rates[2:15] == [base] * 13  # 20 steps - 3 warmup - 5 decay: 12 stable ones after the last warmup step
    # transformers' linear decay over 5 steps to 0.2 of the rate: factor 1 - 0.8 * k / 5 at decay step k
    assert rates[15:] == pytest.approx([base * (1 - 0.8 * k / 5) for k in range(5)])
    with pytest.raises(PrefoptError, match="num_decay_steps .5. and train.warmup_steps .3. add up to more than"):
        build_schedule(recipe, 7)


def test_the_rate_of_a_step_is_a_function_of_the_step_alone():
    """A resumed run asks for step N first, in a fresh process: it must get what an uninterrupted run got."""
    recipe = _recipe(learning_rate=1e-3, warmup_steps=3, lr_scheduler={"name": "cosine_with_min_lr", "min_lr": 1e-4})
    uninterrupted = [learning_rate_at(recipe, 30, step) for step in range(30)]
    optim._schedule.cache_clear()  # as in a fresh process
    assert [learning_rate_at(recipe, 30, step) for step in reversed(range(30))] == uninterrupted[::-1]
    assert isinstance(build_schedule(recipe, 30), Schedule)


# ----------------------------------------------------------------------------------------------------------
# the recipe's errors: at validation, one line each, naming the key


@pytest.mark.parametrize("train,message", [
    ({"optimizer": "adamw"}, "train.optimizer: unknown optimizer 'adamw' (did you mean 'AdamW'?); torch.optim has "),
    ({"optimizer": {"name": "SGD", "momentun": 0.9}},
     "train.optimizer: unknown option 'momentun' of optimizer 'SGD' (did you mean 'momentum'?); SGD takes momentum, "),
    ({"optimizer": {"name": "AdamW", "betas": [0.9, 0.95]}},
     "train.optimizer: option 'betas' of optimizer 'AdamW' is set by train.adam_beta1 and train.adam_beta2"),
    ({"optimizer": {"name": "SGD", "lr": 0.1}}, "option 'lr' of optimizer 'SGD' is set by train.learning_rate"),
    ({"optimizer": {"name": "SGD", "nesterov": True}},
     "train.optimizer: optimizer 'SGD' refuses these options: Nesterov momentum requires a momentum"),
    ({"optimizer": "Rprop", "weight_decay": 0.1}, "optimizer 'Rprop' takes no weight decay; set train.weight_decay to"),
    ({"optimizer": "LBFGS"}, "optimizer 'LBFGS' cannot train here: its step() needs a closure"),
    ({"lr_scheduler": "cosin"}, "train.lr_scheduler: unknown schedule 'cosin' (did you mean 'cosine'?); one of "),
    ({"lr_scheduler": {"name": "cosine_with_min_lr", "min_lr_rat": 0.1}},
     "unknown option 'min_lr_rat' of schedule 'cosine_with_min_lr' (did you mean 'min_lr_rate'"),
    ({"lr_scheduler": "cosine_with_min_lr"}, "schedule 'cosine_with_min_lr' needs min_lr_rate or min_lr"),
    ({"lr_scheduler": "warmup_stable_decay"}, "schedule 'warmup_stable_decay' needs num_decay_steps"),
    ({"lr_scheduler": {"name": "linear", "num_warmup_steps": 3}}, "option 'num_warmup_steps' of schedule 'linear' is "
                                                                   "set by the engine (train.warmup_steps"),
    ({"lr_scheduler": {"name": "polynomial", "lr_end": 1.0}}, "schedule 'polynomial' refuses these options: lr_end"),
    ({"lr_scheduler": "reduce_lr_on_plateau"}, "schedule 'reduce_lr_on_plateau' is not offered: it follows a metric"),
])
def test_a_wrong_optimizer_or_schedule_is_one_problem_naming_its_key(train, message):
    with pytest.raises(RecipeError) as caught:
        _recipe(**train)
    assert len(caught.value.problems) == 1 and message in caught.value.problems[0], caught.value.problems


def test_prefopt_validate_reports_a_misspelt_optimizer_option(tmp_path, pairs_file, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": str(pairs_file)}, "loss": {"name": "dpo"},
                                    "train": {"optimizer": {"name": "SGD", "momentun": 0.9}}}))
    error = one_line_error(capsys, ["validate", str(path)])
    assert "train.optimizer: unknown option 'momentun' of optimizer 'SGD' (did you mean 'momentum'?)" in error
