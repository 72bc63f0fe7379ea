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


# ----------------------------------------------------------------------------------------------------------
# One wording for every problem (prefopt.recipe.problems)


def test_problems_name_each_key_as_the_user_writes_it():
    """List items in brackets, an unknown key with the closest allowed one, a missing key, a validator's own
    message without pydantic's label, and any other error with the value it got; each problem once."""
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

    from prefopt.recipe import format_problems

    class Item(BaseModel):
        model_config = ConfigDict(extra="forbid")
        beta: float = Field(0.1, gt=0)

    class Outer(BaseModel):
        model_config = ConfigDict(extra="forbid")
        items: list[Item]
        name: str

        @field_validator("name")
        @classmethod
        def _short(cls, name: str) -> str:
            if len(name) > 3:
                raise ValueError(f"{name!r} is longer than 3 characters")
            return name

    with pytest.raises(ValidationError) as caught:
        Outer.model_validate({"items": [{"beta": -1}, {"bta": 1}], "nam": "x"})
    assert format_problems(caught.value, model=Outer) == [
        "items[0].beta: Input should be greater than 0 (got -1)",
        "items[1].bta: unknown key (did you mean 'beta'?)",
        "name: required but missing",
        "nam: unknown key (did you mean 'name'?)",
    ]
    with pytest.raises(ValidationError) as caught:
        Outer.model_validate({"items": [], "name": "long"})
    assert format_problems(caught.value, where="section") == ["section.name: 'long' is longer than 3 characters"]
    with pytest.raises(ValidationError) as caught:
        Item.model_validate({"bta": 1})
    assert format_problems(caught.value, where="loss", siblings=["beta"], owner="loss 'x'") == [
        "loss.bta: unknown option of loss 'x' (did you mean 'beta'?)"]


def test_recipe_problems_name_the_plugin_whose_option_is_unknown():
    """Plugin sections (loss, data.task, algorithm) name their plugin for an unknown option, with that plugin's
    options as suggestions; an engine section suggests its own keys; list items are in brackets."""
    from prefopt.errors import RecipeError

    quickstart = next(p for p in RECIPES if p.name == "quickstart.yaml")
    with pytest.raises(RecipeError) as caught:
        load_recipe(quickstart, ["loss.bta=0.2", "algorithm.name=stepwise", "algorithm.chunk=2",
                                 "train.learning_rat=1", "reference.extra=[1]"])
    problems = caught.value.problems
    assert "loss.bta: unknown option of loss 'dpo' (did you mean 'beta'?)" in problems
    assert any(p.startswith("algorithm.chunk: unknown option of algorithm 'stepwise'") for p in problems)
    assert "train.learning_rat: unknown key (did you mean 'learning_rate'?)" in problems
    assert "reference.extra[0]: Input should be a valid string (got 1)" in problems
    assert len(problems) == 4
    with pytest.raises(RecipeError) as caught:
        load_recipe(quickstart, ["data.path=null", "data.task.name=sentiment", "data.task.siez=3"])
    (problem,) = caught.value.problems
    assert problem.startswith("data.task.siez: unknown option of task 'sentiment'")
