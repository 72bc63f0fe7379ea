"""A recipe as one level of dotted keys: the bench's recipe comparison and TensorBoard's hparams read the same."""

from __future__ import annotations

from helpers import validated
from prefopt.engine.records import flat_config
from prefopt.recipe.flatten import flatten


def test_flatten_joins_keys_with_dots_and_keeps_leaves_as_they_are():
    tree = {"train": {"learning_rate": 1e-6, "lr_scheduler": {"name": "linear"}}, "reference": {"extra": ["a", "b"]},
            "eval": {}, "seed": 3, 1: {"x": None}}
    assert flatten(tree) == {"train.learning_rate": 1e-6, "train.lr_scheduler.name": "linear",
                             "reference.extra": ["a", "b"], "seed": 3, "1.x": None}
    assert flatten([1, 2]) == {"": [1, 2]} and flatten({}) == {}


def test_flat_config_gives_tensorboard_scalars_only():
    train = {"optimizer": {"name": "SGD", "momentum": 0.9}}
    tree = {"data": {"path": "pairs.jsonl"}, "loss": {"name": "dpo"}, "reference": {"extra": ["other-model"]}}
    recipe = validated({**tree, "train": train})
    flat = flat_config(recipe)
    assert flat["train.learning_rate"] == 5e-6 and flat["train.optimizer.momentum"] == 0.9
    assert flat["reference.extra"] == "['other-model']" and flat["train.max_steps"] == "None"
    assert all(isinstance(value, (int, float, str, bool)) for value in flat.values())
