"""Every hook prefopt calls. Specs only: pluggy keeps the names, so the docstrings carry the meaning.

A plugin implements any subset with ``@prefopt.hookimpl``. Hooks return *classes*, not instances;
each class's ``name`` must be unique across all plugins of its kind. Hooks evolve only by gaining
arguments (pluggy lets an implementation take fewer arguments than its spec).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("prefopt")


@hookspec
def prefopt_register_losses() -> list[type]:
    """Return ``prefopt.PreferenceLoss`` subclasses (not instances) that recipes can name in ``loss.name``.

    .. versionadded:: 0.1
    """


@hookspec
def prefopt_register_tasks() -> list[type]:
    """Return ``prefopt.Task`` subclasses (not instances) that recipes can name in ``data.task.name``.

    .. versionadded:: 0.1
    """


@hookspec
def prefopt_register_algorithms() -> list[type]:
    """Return ``prefopt.Algorithm`` subclasses (not instances) that recipes can name in ``algorithm.name``.

    .. versionadded:: 0.2
    """


@hookspec
def prefopt_register_samplers() -> list[type]:
    """Return ``prefopt.Sampler`` subclasses (not instances) that recipes can name in ``algorithm.sampler.name``.

    .. versionadded:: 0.3
    """


@hookspec
def prefopt_register_judges() -> list[type]:
    """Return ``prefopt.Judge`` subclasses (not instances) that recipes can name in ``algorithm.judge.name``.

    .. versionadded:: 0.3
    """
