"""``derive_recipe``: a validated recipe with some keys changed, for an algorithm's phases.

An algorithm trains on recipes it derives from the user's: each stage of stepwise DPO has its own output
directory and starting model, an on-policy run drops the ``algorithm`` section and makes the reference
live. Deriving goes through the same validation as a recipe file, so a derived recipe is never one a user
could not have written, and a bad change is a one-line error naming its key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from prefopt.errors import PrefoptError
from prefopt.recipe.load import validate_tree
from prefopt.registry.loading import Plugins

__all__ = ["derive_recipe"]


def derive_recipe(recipe: BaseModel, plugins: Plugins, changes: Mapping[str, Any], source: str) -> BaseModel:
    """``recipe`` with ``changes`` applied, validated against ``plugins``.

    ``changes`` maps keys to new values. A key is a section (``"reference": {"kind": "live"}``) or a dotted
    path (``"reference.kind": "live"``); a mapping given for a section changes only the keys it names, the
    rest of the section stays as it was. Any other value replaces the key's, and ``None`` clears it:
    ``{"algorithm": None}`` drops the algorithm section (a phase of an algorithm runs the plain engine).
    ``source`` names the derived recipe in errors (e.g. ``"runs/sdpo stage 2"``); a change the schema
    refuses raises ``RecipeError`` with one line per problem, as a recipe file would.
    """
    tree = recipe.model_dump(mode="json")  # a fresh tree: the recipe itself is frozen and stays as it was
    for key, value in changes.items():
        _set(tree, key.split("."), value, source)
    return validate_tree(tree, plugins, source)


def _set(tree: dict, keys: list[str], value: Any, source: str) -> None:
    """``tree[k1][k2]... = value``, merging a mapping into a section already there key by key."""
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise PrefoptError(f"{source}: cannot change {'.'.join(keys)}: {where} is {child!r}, not a section")
        node = child
    last = keys[-1]
    if isinstance(value, Mapping) and isinstance(node.get(last), dict):
        for key, inner in value.items():
            _set(node[last], key.split("."), inner, source)
    else:
        node[last] = dict(value) if isinstance(value, Mapping) else value
