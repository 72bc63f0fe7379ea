"""``derive_recipe``: a recipe with some keys changed, validated, as an algorithm derives each run's recipe."""

from __future__ import annotations

import pytest

from helpers import tiny_recipe, validated
from prefopt import derive_recipe
from prefopt.errors import PrefoptError, RecipeError
from prefopt.registry.loading import default_plugins


@pytest.fixture()
def recipe(tmp_path):
    return validated(tiny_recipe(tmp_path / "model", tmp_path / "pairs.jsonl", tmp_path / "run",
                                 algorithm={"name": "stepwise", "stages": 2}))


def test_sections_merge_key_by_key_and_dotted_keys_reach_into_them(recipe, tmp_path):
    derived = derive_recipe(recipe, default_plugins(), {
        "algorithm": None, "reference": {"kind": "live"}, "train.learning_rate": 5e-4, "output.dir": "elsewhere",
    }, "test derived")
    assert derived.algorithm is None
    assert derived.reference.kind == "live" and derived.reference.batch_size == recipe.reference.batch_size
    assert derived.train.learning_rate == 5e-4 and derived.train.batch_size == recipe.train.batch_size
    assert derived.output.dir == "elsewhere" and derived.output.trackers == recipe.output.trackers
    # the recipe it came from is untouched
    assert recipe.algorithm.name == "stepwise" and recipe.output.dir == str(tmp_path / "run")


def test_a_bad_change_is_a_one_line_error_naming_its_key(recipe):
    with pytest.raises(RecipeError) as caught:
        derive_recipe(recipe, default_plugins(), {"train": {"batch_size": 0}}, "runs/x stage 2")
    assert str(caught.value).startswith("runs/x stage 2: train.batch_size: ") and "\n" not in str(caught.value)
    with pytest.raises(RecipeError, match="did you mean 'learning_rate'"):
        derive_recipe(recipe, default_plugins(), {"train.learning_rat": 1e-4}, "runs/x")
    with pytest.raises(PrefoptError, match=r"^runs/x: cannot change model.path.x: model.path is .*, not a section$"):
        derive_recipe(recipe, default_plugins(), {"model.path.x": 1}, "runs/x")
