"""Pydantic validation errors as one-line problems that name the key as the user wrote it.

One wording for every validated mapping (recipes, bench recipes, a plugin's options, a mixture's
components), so that a mistake reads the same wherever it is made::

    train.learning_rat: unknown key (did you mean 'learning_rate'?)
    loss.components[0].bta: unknown option of loss 'dpo' (did you mean 'beta'?)
    output.dir: required but missing
    loss.beta: Input should be greater than 0 (got -1)

``format_problems`` (public as ``prefopt.format_problems``) serves plugins that validate options of their
own, as ``mix`` does its components; ``recipe_problems`` adds what only a recipe has: the tags of plugin
unions in error locations, and plugin names that are not registered.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from pydantic import BaseModel, ValidationError

from prefopt.errors import did_you_mean
from prefopt.registry.kinds import KINDS, PluginKind, kind_at

if TYPE_CHECKING:
    from prefopt.registry.loading import Plugins

__all__ = ["describe_error", "fields_at", "format_problems", "key_path", "recipe_problems"]


def key_path(loc: Sequence[str | int], where: str = "") -> str:
    """A pydantic error location as a key the user writes: ``('components', 0, 'beta')`` under ``loss`` is
    ``loss.components[0].beta``."""
    return (where + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)).lstrip(".")


def fields_at(model: Any, loc: Sequence[str | int]) -> list[str]:
    """Field names of the (sub-)model ``loc`` points into (list indices skipped; of a union, its one model
    member), for did-you-mean suggestions; [] where ``loc`` leaves the models."""
    for key in loc:
        if isinstance(key, int):
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None or key not in fields:
            return []
        model = fields[key].annotation
        members = [a for a in typing.get_args(model) if hasattr(a, "model_fields")]  # Optional[Section], list[X]
        if members:
            model = members[0]
    return list(getattr(model, "model_fields", None) or {})


def describe_error(
    error: dict, *, where: str = "", loc: Sequence[str | int] | None = None, siblings: Iterable[str] = (),
    owner: str | None = None, root: str = "(recipe)",
) -> str:
    """One pydantic error as ``<key>: <what is wrong>``.

    ``where`` is the key the validated mapping sits at (``loss.components[0]``); ``loc`` the error's location
    in it when that is not ``error["loc"]``; ``siblings`` the keys allowed beside an unknown one, for a
    did-you-mean; ``owner`` names the plugin whose options these are (``loss 'dpo'``), so that an unknown key
    reads "unknown option of loss 'dpo'"; ``root`` names the whole mapping, for an error at its top.
    """
    loc = tuple(error["loc"] if loc is None else loc)
    path = key_path(loc, where) or root
    kind = error["type"]
    if kind == "extra_forbidden":
        unknown = f"unknown option of {owner}" if owner else "unknown key"
        return f"{path}: {unknown}{did_you_mean(str(loc[-1]), siblings)}"
    if kind == "missing":
        return f"{path}: required but missing"
    message = error["msg"].removeprefix("Value error, ")  # a validator's own message needs no label
    if kind == "value_error":
        return f"{path}: {message}"
    return f"{path}: {message} (got {error.get('input')!r})"


def format_problems(
    exc: ValidationError, *, where: str = "", model: Any = None, siblings: Iterable[str] | None = None,
    owner: str | None = None, root: str = "(recipe)",
) -> list[str]:
    """Every error of ``exc`` as one line (``describe_error``), in order, each once. Did-you-mean suggestions
    come from ``siblings`` when given, else from the fields of ``model`` (the validated model) beside the key."""
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        near = list(siblings) if siblings is not None else fields_at(model, loc[:-1])
        lines.append(describe_error(error, where=where, loc=loc, siblings=near, owner=owner, root=root))
    return list(dict.fromkeys(lines))


# ----------------------------------------------------------------------------------------------------------
# recipes: plugin unions


def recipe_problems(exc: ValidationError, schema: type[BaseModel], tree: dict, plugins: Plugins) -> list[str]:
    """Every error of a recipe's validation as one line, each once (``schema`` is ``recipe_model(plugins)``,
    ``tree`` the mapping it validated)."""
    return list(dict.fromkeys(_recipe_problem(error, schema, tree, plugins) for error in exc.errors()))


def _recipe_problem(error: dict, schema: type[BaseModel], tree: dict, plugins: Plugins) -> str:
    """One error of a recipe's validation as one line; what is not about plugins reads as ``describe_error``."""
    loc = _untagged(tuple(error["loc"]), plugins)
    path = key_path(loc) or "(recipe)"
    kind = error["type"]
    # A name no plugin has: the tag of a union, or the literal name when only one plugin of the kind is registered.
    if kind == "union_tag_invalid" or (kind == "literal_error" and loc[-1:] == ("name",)):
        registry = _registry_at(loc, plugins)
        given = error.get("input")
        if isinstance(given, dict):
            given = given.get("name")
        names = registry.names()
        return (f"{path if path.endswith('name') else path + '.name'}: unknown {registry.kind} {given!r}"
                f"{did_you_mean(str(given), names)}; registered: {', '.join(names)}")
    if kind == "union_tag_not_found":
        return f"{path}.name: missing; choose one of {', '.join(_registry_at(loc, plugins).names())}"
    if kind == "value_error" and loc == ("data",):
        return error["msg"].removeprefix("Value error, ")  # the data section's own checks name their keys
    if kind == "extra_forbidden":
        owner = _plugin_named_at(loc[:-1], tree, plugins)
        if owner is not None:
            plugin_kind, name = owner
            options = plugins.registry(plugin_kind).get(name).Config.model_fields
            return describe_error(error, loc=loc, siblings=options, owner=f"{plugin_kind.name} {name!r}")
    return describe_error(error, loc=loc, siblings=fields_at(schema, loc[:-1]))


def _untagged(loc: tuple, plugins: Plugins) -> tuple:
    """``loc`` without the tags of plugin unions: pydantic reports ``loss.dpo.beta`` where the user wrote
    ``loss.beta``."""
    for kind in KINDS:
        depth = len(kind.recipe_path)
        if kind.in_schema and loc[:depth] == kind.recipe_path and len(loc) > depth:
            if loc[depth] in plugins.registry(kind):
                loc = loc[:depth] + loc[depth + 1 :]
    return loc


def _registry_at(loc: tuple, plugins: Plugins):
    """The registry of the plugin section holding ``loc``: a name outside ``data.task`` and ``algorithm`` is the
    loss's, the one plugin section every recipe has."""
    return plugins.registry(kind_at(loc) or KINDS[0])


def _plugin_named_at(section: tuple, tree: dict, plugins: Plugins) -> tuple[PluginKind, str] | None:
    """The kind and the registered name of the plugin whose options hold ``section``, or None."""
    kind = kind_at(section)
    if kind is None:
        return None
    node: Any = tree
    for key in kind.recipe_path:
        node = node.get(key) if isinstance(node, dict) else None
    name = node.get("name") if isinstance(node, dict) else None
    return (kind, name) if isinstance(name, str) and name in plugins.registry(kind) else None
