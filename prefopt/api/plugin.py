"""What every plugin has, whatever its kind: a name, a Config, a citation and a one-line summary.

Losses, tasks, algorithms, samplers and judges each subclass ``Plugin`` through their own base class
(``PreferenceLoss``, ``Task``, ...), and their options subclass ``PluginConfig`` through their kind's
config base (``LossConfig``, ``TaskConfig``, ...). Plugin loading refuses a class whose ``name`` is not an
identifier or whose ``Config`` is not a subclass of its kind's config base, naming the plugin
(``prefopt.registry.loading.Registry.add``).
"""

from __future__ import annotations

import abc
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

__all__ = ["Plugin", "PluginConfig"]


class PluginConfig(BaseModel):
    """Base of every plugin's options. Unknown keys are errors (a misspelt option never passes silently), and
    a validated config is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin(abc.ABC):
    """Base of every plugin class. A subclass sets ``name`` (the identifier recipes name it by, unique among
    its kind), ``Config`` (its options, a subclass of its kind's config base), ``paper`` (a citation, with
    its arXiv id where there is one) and a docstring whose first line is the summary ``prefopt list`` shows."""

    name: ClassVar[str]
    Config: ClassVar[type[PluginConfig]]
    paper: ClassVar[str] = ""

    @classmethod
    def summary(cls) -> str:
        """The first line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
