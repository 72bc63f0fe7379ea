"""Non-finite numbers in a validated recipe: every ``inf`` or ``nan``, in any section, is a problem.

A bound such as ``gt=0`` lets ``inf`` through (``loss.beta: .inf`` is greater than 0), and YAML writes
infinity and NaN as plain scalars (``.inf``, ``.nan``, and ``1e999`` overflows to ``inf``); pydantic also
reads the strings ``"inf"`` and ``"nan"`` into a float field. A recipe holding one trains to NaN losses a
few steps in, so the validated recipe is walked once here, whatever section or plugin the number belongs
to, rather than each field refusing it on its own: a plugin's ``Config`` gets the check without asking.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel

from prefopt.recipe.problems import key_path

__all__ = ["nonfinite_problems"]


def nonfinite_problems(recipe: BaseModel) -> list[str]:
    """One line per non-finite number in ``recipe``, naming its key as the user writes it."""
    return [f"{key_path(loc)}: {value} is not a finite number; give a finite value"
            for loc, value in _numbers(recipe.model_dump(), ()) if not math.isfinite(value)]


def _numbers(node: Any, loc: tuple) -> list[tuple[tuple, float]]:
    """Every float below ``node`` (a dumped recipe: mappings, lists and scalars) with its location."""
    if isinstance(node, dict):
        return [found for key, value in node.items() for found in _numbers(value, (*loc, key))]
    if isinstance(node, (list, tuple)):
        return [found for i, value in enumerate(node) for found in _numbers(value, (*loc, i))]
    return [(loc, node)] if isinstance(node, float) else []
