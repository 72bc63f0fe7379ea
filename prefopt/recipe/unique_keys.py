"""YAML as ``yaml.safe_load`` reads it, except that a key given twice in one mapping is refused.

PyYAML keeps the last of two equal keys without a word, so ``beta: 0.1`` followed further down the same
section by ``beta: 0.5`` would train with 0.5 while the reader sees 0.1. ``UniqueKeyLoader`` checks every
mapping of the document before building it and raises ``DuplicateKeyError`` naming the key's dotted path
and both lines; everything else (tags, anchors, merge keys ``<<``) is ``yaml.SafeLoader``'s.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["DuplicateKeyError", "UniqueKeyLoader", "safe_load_unique"]

MERGE_TAG = "tag:yaml.org,2002:merge"
UNCHECKED = object()  # a key that is not a hashable scalar


class DuplicateKeyError(yaml.YAMLError):
    """A mapping repeats a key: ``key`` is its dotted path, ``line`` and ``first_line`` are 1-based."""

    def __init__(self, key: str, line: int, first_line: int) -> None:
        self.key, self.line, self.first_line = key, line, first_line
        super().__init__(f"key {key!r} on line {line} is already set on line {first_line}")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (see the module docstring)."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_keys(node, "", set())
        return super().construct_document(node)

    def _check_keys(self, node: yaml.Node, path: str, visited: set[int]) -> None:
        if id(node) in visited:  # an alias: its anchor was checked where it was defined (and may recurse)
            return
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._check_keys(item, f"{path}[{index}]", visited)
        elif isinstance(node, yaml.MappingNode):
            first_lines: dict[Any, int] = {}
            for key_node, value_node in node.value:
                # Keys merged in with ``<<`` may be overridden on purpose; only keys written here must differ.
                if key_node.tag == MERGE_TAG:
                    continue
                key = self._scalar_key(key_node)
                dotted = f"{path}.{key}" if path else str(key)
                line = key_node.start_mark.line + 1
                if key is not UNCHECKED:
                    if key in first_lines:
                        raise DuplicateKeyError(dotted, line, first_lines[key])
                    first_lines[key] = line
                self._check_keys(value_node, dotted, visited)

    def _scalar_key(self, key_node: yaml.Node) -> Any:
        """The key as the constructor will build it; UNCHECKED for a key that is not a hashable scalar (the
        constructor reports those itself)."""
        if not isinstance(key_node, yaml.ScalarNode):
            return UNCHECKED
        key = self.construct_object(key_node)
        try:
            hash(key)
        except TypeError:
            return UNCHECKED
        return key


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing repeated keys with ``DuplicateKeyError``."""
    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
