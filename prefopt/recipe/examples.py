"""The example recipes that ship with prefopt, by short name: what ``prefopt init`` writes and
``prefopt list recipe`` lists.

They are the YAML files of the repository's ``recipes/`` folder, installed as the package data of
``prefopt._recipes`` (pyproject.toml maps the folder to that package), so a wheel carries them and an
editable install reads the folder in place. A folder's ``quickstart.yaml`` is named after its folder
(``recipes/dpo/quickstart.yaml`` is ``dpo``); every other file is ``folder/stem`` (``online/online_dpo``,
``bench/smoke``, ``accelerate/ddp_cpu``).

A bench recipe names its training recipe by a path relative to itself (``base: ../dpo/quickstart.yaml``),
which does not exist beside a copy written elsewhere. ``write`` therefore also writes that training
recipe beside the bench recipe, under the name ``write`` gives it (``dpo.yaml``), unless a file of that
name is there already (then that file is the base), and points ``base`` at it.
"""

from __future__ import annotations

import importlib.resources
import posixpath
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from prefopt.errors import PrefoptError, did_you_mean
from prefopt.paths import atomic_write_text

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # importlib.abc before Python 3.11

__all__ = ["describe", "names", "text", "write"]

PACKAGE = "prefopt._recipes"
QUICKSTART = "quickstart.yaml"
# Listed after the training recipes, in this order: they are run differently (prefopt bench, accelerate launch).
_FOLDERS_LAST = ("bench", "accelerate")
# A bench recipe's top-level `base:` line; group 2 is the path, group 3 whatever follows it (its comment).
_BASE_LINE = re.compile(r"^(base:\s*)(\S+)(.*)$", re.MULTILINE)


def names() -> list[str]:
    """Every example's short name: the quickstarts, the other training recipes, then bench and accelerate."""
    return list(_index())


def text(name: str) -> str:
    """The example's YAML text, comments included, as shipped."""
    return _resource(name).read_text(encoding="utf-8")


def describe(name: str) -> str:
    """The example's first comment line (what ``prefopt list recipe`` shows beside its name)."""
    for line in text(name).splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def write(name: str, folder: Path, *, overwrite: bool = False) -> Path:
    """Write the example as ``<folder>/<last part of name>.yaml`` (atomically) and return that path.

    An existing file is replaced only with ``overwrite``. A bench recipe's training recipe is written
    beside it when no file of that name is there (see the module docstring).
    """
    content = text(name)
    folder = Path(folder)
    target = folder / _file_name(name)
    if target.exists() and not overwrite:
        raise PrefoptError(f"{target} exists already; pass --overwrite to replace it, or write into another folder")
    base = _shipped_base(name, content)
    if base is not None:
        base_file = folder / _file_name(base)
        if not base_file.exists():
            atomic_write_text(base_file, text(base))
        content = _BASE_LINE.sub(lambda m: f"{m[1]}{base_file.name}{m[3]}", content, count=1)
    atomic_write_text(target, content)
    return target


@lru_cache(maxsize=1)
def _index() -> dict[str, Traversable]:
    """Short name -> the shipped file, in the order ``names`` gives."""
    found: dict[str, Traversable] = {}
    root = importlib.resources.files(PACKAGE)
    for folder in sorted((f for f in root.iterdir() if f.is_dir()), key=lambda f: f.name):
        for file in sorted(folder.iterdir(), key=lambda f: f.name):
            if file.is_file() and file.name.endswith(".yaml"):
                found[_short_name(folder.name, file.name)] = file
    return dict(sorted(found.items(), key=lambda item: _order(item[0])))


def _short_name(folder: str, file_name: str) -> str:
    return folder if file_name == QUICKSTART else f"{folder}/{file_name.removesuffix('.yaml')}"


def _order(name: str) -> tuple:
    folder = name.split("/")[0]
    late = _FOLDERS_LAST.index(folder) + 1 if folder in _FOLDERS_LAST else 0
    return (late, "/" in name, name)


def _resource(name: str) -> Traversable:
    index = _index()
    if name not in index:
        raise PrefoptError(
            f"no example recipe named {name!r}{did_you_mean(name, index)}; `prefopt list recipe` lists them all"
        )
    return index[name]


def _file_name(name: str) -> str:
    return name.rsplit("/", 1)[-1] + ".yaml"


def _shipped_base(name: str, content: str) -> str | None:
    """The short name of the shipped recipe a bench recipe's relative ``base`` names, else None."""
    match = _BASE_LINE.search(content)
    if match is None or "/" not in name:
        return None
    folder = name.split("/")[0]
    relative = posixpath.normpath(posixpath.join(folder, match[2]))  # "bench/../dpo/quickstart.yaml" -> "dpo/..."
    if "/" not in relative:
        return None
    base = _short_name(*relative.rsplit("/", 1))
    return base if base in _index() else None
