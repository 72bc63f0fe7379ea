"""User-facing errors. The CLI prints these as one line (no traceback) and exits with the error's
``exit_status``: 2, or 3 for training that stopped on a non-finite loss or gradient."""

from __future__ import annotations

import difflib
from typing import Iterable


class PrefoptError(Exception):
    """A mistake the user can fix: the message says what is wrong, where, and how to fix it."""

    exit_status = 2


class NonFiniteError(PrefoptError):
    """Training produced a non-finite loss or gradient norm and stopped; the message names the step and the
    newest checkpoint written from finite weights. A status of its own, so a scheduler can tell a diverged
    run (retry with other settings) from a mistake in the recipe."""

    exit_status = 3


class RecipeError(PrefoptError):
    """One or more recipe problems; ``problems`` holds one line per problem, all found at once."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{source}: {problems[0]}")
        else:
            super().__init__(f"{source}: {len(problems)} problems" + "".join(f"\n  {p}" for p in problems))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
