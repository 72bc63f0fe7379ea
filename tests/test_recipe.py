"""Recipes: every shipped YAML validates, every key is commented, overrides parse as YAML values."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefopt.errors import PrefoptError
from prefopt.recipe import apply_override, load_recipe, parse_override

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))
# accelerate launch configs and bench recipes (tests/test_bench.py validates those) are not training recipes
TRAINING_RECIPES = [p for p in RECIPES if "accelerate" not in p.parts and "bench" not in p.parts]


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in TRAINING_RECIPES)


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_recipe_validates(path):
    load_recipe(path)


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_key_of_a_shipped_recipe_is_commented(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        is_section = stripped.endswith(":")  # a section header: its keys carry the comments
        if stripped and not stripped.startswith("#") and ":" in stripped and not is_section:
            assert "#" in stripped, f"{path.name}:{number} has no comment: {stripped}"


@pytest.mark.parametrize(
    "text, keys, value",
    [
        ("loss.beta=0.2", ["loss", "beta"], 0.2),
        ("train.learning_rate=1e-5", ["train", "learning_rate"], 1e-5),
        ("output.trackers=[]", ["output", "trackers"], []),
        ("model.lora=null", ["model", "lora"], None),
        ("output.dir=runs/x", ["output", "dir"], "runs/x"),
        ("train.max_steps=10", ["train", "max_steps"], 10),
    ],
)
def test_overrides_are_yaml_values(text, keys, value):
    assert parse_override(text) == (keys, value)


def test_override_without_equals_is_an_error():
    with pytest.raises(PrefoptError, match="dotted.key=value"):
        parse_override("loss.beta")


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(PrefoptError, match="not a section"):
        apply_override({"loss": "dpo"}, ["loss", "beta"], 0.1)


def test_quickstart_overrides_apply(tmp_path):
    quickstart = next(p for p in RECIPES if p.name == "quickstart.yaml")
    recipe = load_recipe(quickstart, ["loss.beta=0.3", "train.max_steps=5"])
    assert recipe.loss.beta == 0.3 and recipe.train.max_steps == 5
