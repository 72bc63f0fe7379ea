"""A recipe tree as one level of dotted keys: what TensorBoard's hparams take, and how two recipes are diffed."""

from __future__ import annotations

from typing import Any


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"learning_rate": 1e-6}}`` as ``{"train.learning_rate": 1e-6}``; leaves are kept as they are
    (lists included), an empty mapping leaves no key, and a tree that is not a mapping is ``{prefix: tree}``."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
