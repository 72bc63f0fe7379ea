"""Reading recipes: YAML files, dotted-key overrides, and validation that reports every problem at once.

``load_recipe`` reads a YAML file, applies command-line overrides (``loss.beta=0.2``: dotted keys, YAML
values) and validates the tree against the schema of the plugins loaded now (``schema.recipe_model``);
every problem is one line naming its dotted key (``problems.py``), all of them in one ``RecipeError``.
``build_loss`` and ``build_algorithm`` make the plugins a validated recipe names.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from prefopt.errors import PrefoptError, RecipeError
from prefopt.recipe.finite import nonfinite_problems
from prefopt.recipe.problems import recipe_problems
from prefopt.recipe.samples import samples_plugins
from prefopt.recipe.schema import check_eval_needs, check_loss_needs, recipe_model
from prefopt.recipe.unique_keys import DuplicateKeyError, safe_load_unique
from prefopt.registry.loading import Plugins

__all__ = [
    "apply_override", "build_algorithm", "build_loss", "check_prompt_only_data", "dump_recipe", "load_recipe",
    "parse_override", "read_yaml", "validate_tree",
]


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
    """A recipe file's tree, read as ``yaml.safe_load`` reads it except that a repeated key is refused."""
    if not path.is_file():
        raise PrefoptError(f"recipe {path} not found")
    try:
        tree = safe_load_unique(_read_text(path))
    except DuplicateKeyError as exc:
        raise PrefoptError(
            f"recipe {path} line {exc.line}: {exc.key} is set twice (first on line {exc.first_line}); "
            "YAML would keep only the last, so delete one"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PrefoptError(f"recipe {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if tree is None:
        raise PrefoptError(f"recipe {path} is empty; start from recipes/dpo/quickstart.yaml")
    if not isinstance(tree, dict):
        raise PrefoptError(f"recipe {path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    return tree


def _read_text(path: Path) -> str:
    """The file's text; an unreadable file or one that is not UTF-8 is a one-line error naming it."""
    try:
        data = path.read_bytes()
    except PermissionError:
        raise PrefoptError(f"recipe {path}: permission denied; make the file readable (chmod u+r {path})") from None
    except OSError as exc:
        raise PrefoptError(f"recipe {path}: cannot read the file ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PrefoptError(
            f"recipe {path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        ) from None


def validate_tree(tree: dict, plugins: Plugins, source: str) -> BaseModel:
    schema = recipe_model(plugins)
    try:
        recipe = schema.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(source, recipe_problems(exc, schema, tree, plugins)) from None
    nonfinite = nonfinite_problems(recipe)  # every section's, plugins' options included
    if nonfinite:
        raise RecipeError(source, nonfinite)
    try:
        # a loss may check more than its schema can (a mixture's components), and rule out other settings
        check_loss_needs(recipe, build_loss(recipe, plugins))
        check_eval_needs(recipe)  # eval.early_stopping needs train.eval_every and held-out pairs
        samples_plugins(recipe, plugins)  # eval.samples: its sampler and judge exist and take their options
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
