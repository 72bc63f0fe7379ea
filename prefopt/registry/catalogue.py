"""The plugin catalogue: every installed plugin's metadata, cached, so `prefopt list` and `prefopt show` answer
without importing the plugins (which import torch: seconds, where reading the catalogue takes milliseconds).

An entry holds what those commands print: kind, name, the package it comes from (with its version), paper,
summary, and every option of its ``Config`` (type, default, bounds, description). The catalogue is a JSON
file under the prefopt cache (one per Python environment), stamped with a fingerprint of what decides the
plugins: the ``prefopt`` entry points (names, modules, their distributions' names and versions),
``PREFOPT_PLUGINS`` and ``PREFOPT_DISABLE_PLUGIN_AUTOLOAD``, and the size and modification time of every
plugin module's files (and of the core's plugin contracts). Computing the fingerprint imports no plugin:
``importlib.util.find_spec`` locates a module's file after importing only its parent packages.

When the stamp differs, or the file is missing or damaged (it is never trusted: every field is checked), the
plugins are loaded as a run loads them (``prefopt.registry.loading``) and the catalogue is written again,
atomically. A catalogue that cannot be written (a read-only cache) is still used for this command.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefopt.errors import PrefoptError, did_you_mean
from prefopt.paths import atomic_write_json, cache_root

__all__ = ["Catalogue", "Entry", "KindInfo", "Option", "catalogue", "catalogue_path", "fingerprint"]

FORMAT = 1  # raised whenever what an entry holds changes, so an older file is rebuilt
# The names prefopt.registry.loading reads; repeated here because importing it imports torch.
GROUP = "prefopt"
AUTOLOAD_OFF_ENV = "PREFOPT_DISABLE_PLUGIN_AUTOLOAD"
EXTRA_PLUGINS_ENV = "PREFOPT_PLUGINS"
# The core files that shape every entry: the plugin base classes and their configs, the table of kinds.
CORE_FOLDERS = ("api", "registry")


@dataclass(frozen=True)
class Option:
    """One option of a plugin's ``Config``, as text ready to print."""

    name: str
    type: str  # "float", "reverse_kl | forward_kl", "int | null"
    default: str | None  # in YAML's flow style ("0.1", "null", "[a, b]"); None when the option is required
    bounds: dict[str, float]  # of ge, gt, le, lt, min_length, max_length
    description: str


@dataclass(frozen=True)
class Entry:
    """One registered plugin."""

    kind: str
    name: str
    provider: str  # "prefopt 0.1.0" (distribution and version) or "module my_plugin" (PREFOPT_PLUGINS)
    module: str  # the module that defines the class
    paper: str
    summary: str
    options: tuple[Option, ...]


@dataclass(frozen=True)
class KindInfo:
    """One kind of plugin, from ``prefopt.registry.kinds.KINDS``."""

    name: str  # "loss"
    plural: str  # "losses"
    recipe_key: str  # where a recipe names one: "loss", "data.task", "algorithm.sampler"


@dataclass(frozen=True)
class Catalogue:
    kinds: tuple[KindInfo, ...]  # in the order of KINDS
    entries: tuple[Entry, ...]  # by kind in that order, then by name

    def of_kind(self, kind: str) -> list[Entry]:
        return [entry for entry in self.entries if entry.kind == kind]

    def entry(self, kind: str, name: str) -> Entry:
        """The plugin ``name`` of ``kind``; else a one-line error suggesting the closest name."""
        entries = {entry.name: entry for entry in self.of_kind(kind)}
        if name in entries:
            return entries[name]
        raise PrefoptError(
            f"unknown {kind} {name!r}{did_you_mean(name, entries)}; `prefopt list {kind}` shows the registered ones"
        )


def catalogue() -> Catalogue:
    """The catalogue of the plugins installed now: read from the cache when its stamp matches, else built."""
    stamp = fingerprint()
    path = catalogue_path()
    found = _read(path, stamp)
    if found is not None:
        return found
    data = json.loads(json.dumps({"format": FORMAT, "fingerprint": stamp, **_build()}))  # as read back
    try:
        atomic_write_json(path, data)
    except (PrefoptError, OSError):
        pass  # a cache that cannot be written costs the next command a rebuild, nothing else
    return _parse(data)


def catalogue_path() -> Path:
    """One file per Python environment, so environments sharing a cache do not rebuild each other's."""
    environment = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return cache_root() / "catalogue" / f"plugins-{environment}.json"


# --- the fingerprint


def fingerprint() -> str:
    """A digest of everything that decides which plugins load and what they declare (see the module doc)."""
    entry_points = sorted(importlib.metadata.entry_points(group=GROUP), key=lambda ep: (ep.name, ep.value))
    extra = os.environ.get(EXTRA_PLUGINS_ENV, "")
    modules = [ep.value.split(":")[0].strip() for ep in entry_points]
    modules += [m.strip() for m in extra.split(",") if m.strip()]
    core = Path(__file__).resolve().parent.parent
    seen: dict[int, list[str]] = {}
    state = {
        "format": FORMAT,
        "python": list(sys.version_info[:2]),
        "autoload": os.environ.get(AUTOLOAD_OFF_ENV, ""),
        "extra": extra,
        "entry_points": [[ep.name, ep.value, *_distribution(ep, seen)] for ep in entry_points],
        "modules": {module: _module_files(module) for module in modules},
        "core": _file_stats(sorted(p for folder in CORE_FOLDERS for p in (core / folder).glob("*.py"))),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _distribution(ep: importlib.metadata.EntryPoint, seen: dict[int, list[str]]) -> list[str]:
    """The name and version of the distribution declaring ``ep``, its metadata parsed once per distribution
    (``seen``): parsing it for each of a package's entry points took most of a warm `prefopt list`."""
    dist = ep.dist
    if dist is None:
        return ["", ""]
    if id(dist) not in seen:
        metadata = dist.metadata
        seen[id(dist)] = [metadata["Name"] or "", metadata["Version"] or ""]
    return seen[id(dist)]


def _module_files(module: str) -> list | str:
    """Size and modification time of the files that define ``module``: a package's whole tree, or a module's
    file with its sibling modules (a plugin may keep its options in a helper beside it)."""
    try:
        spec = importlib.util.find_spec(module)  # imports the parent packages only, never the module itself
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "not found"  # loading it fails with a one-line error; the stamp changes once it is found
    if spec.submodule_search_locations:
        files = [p for folder in spec.submodule_search_locations for p in Path(folder).rglob("*.py")]
    elif spec.origin and Path(spec.origin).is_file():
        origin = Path(spec.origin)
        files = list(origin.parent.glob("*.py")) if "." in module else [origin]
    else:
        return f"origin {spec.origin}"  # a built-in or frozen module
    return _file_stats(sorted(files))


def _file_stats(files: list[Path]) -> list:
    stats = []
    for path in files:
        try:
            status = path.stat()
        except OSError:
            continue
        stats.append([str(path), status.st_size, status.st_mtime_ns])
    return stats


# --- reading, never trusting


def _read(path: Path, stamp: str) -> Catalogue | None:
    """The catalogue in ``path`` if it is whole, of this format and stamped ``stamp``; else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("fingerprint") != stamp:
        return None
    try:
        return _parse(data)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _parse(data: dict) -> Catalogue:
    """A ``Catalogue`` from its JSON form, checking every field's type (TypeError on the first wrong one)."""
    kinds = tuple(KindInfo(**_strings(item, ("name", "plural", "recipe_key"))) for item in _list(data["kinds"]))
    known = {kind.name for kind in kinds}
    entries = []
    for item in _list(data["entries"]):
        fields = _strings(item, ("kind", "name", "provider", "module", "paper", "summary"))
        if fields["kind"] not in known:
            raise ValueError(f"entry of unknown kind {fields['kind']!r}")
        entries.append(Entry(**fields, options=tuple(_option(option) for option in _list(item["options"]))))
    return Catalogue(kinds, tuple(entries))


def _option(item: Any) -> Option:
    fields = _strings(item, ("name", "type", "description"))
    default, bounds = item["default"], item["bounds"]
    if not (default is None or isinstance(default, str)):
        raise TypeError("option default")
    if not (isinstance(bounds, dict) and all(isinstance(k, str) and _is_number(v) for k, v in bounds.items())):
        raise TypeError("option bounds")
    return Option(**fields, default=default, bounds=dict(bounds))


def _strings(item: Any, keys: tuple[str, ...]) -> dict[str, str]:
    if not isinstance(item, dict) or not all(isinstance(item.get(key), str) for key in keys):
        raise TypeError(f"expected strings {keys}")
    return {key: item[key] for key in keys}


def _list(value: Any) -> list:
    if not isinstance(value, list):
        raise TypeError("expected a list")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- building: loads the plugins


def _build() -> dict:
    """Every plugin's entry, from the plugins loaded as a run loads them (a broken plugin is a one-line error)."""
    from prefopt.registry.kinds import KINDS
    from prefopt.registry.loading import load_plugins

    plugins = load_plugins()
    kinds = [KindInfo(kind.name, kind.attribute, kind.recipe_key) for kind in KINDS]
    entries = [
        Entry(kind.name, info.name, info.provider, info.cls.__module__, info.cls.paper or "", info.cls.summary(),
              tuple(describe_options(info.cls.Config)))
        for kind in KINDS for info in plugins.registry(kind).infos()
    ]
    return {"kinds": [asdict(kind) for kind in kinds], "entries": [asdict(entry) for entry in entries]}


def describe_options(config: type) -> list[Option]:
    """Every field of the pydantic model ``config``, in declaration order, as text."""
    return [_option_of(name, field) for name, field in config.model_fields.items()]


def _option_of(name: str, field) -> Option:
    default = None
    if not field.is_required():
        try:
            default = flow_text(field.get_default(call_default_factory=True))
        except Exception:  # a factory that needs the other fields' values
            default = "(computed)"
    bounds = {}
    for constraint in field.metadata:
        for key in BOUNDS:
            value = getattr(constraint, key, None)
            if _is_number(value):
                bounds[key] = value
    return Option(name, type_text(field.annotation), default, bounds, " ".join((field.description or "").split()))


BOUNDS = ("ge", "gt", "le", "lt", "min_length", "max_length")


def type_text(annotation: Any) -> str:
    """A field's type as a recipe writer reads it: ``float``, ``int | null``, ``sigmoid | hinge`` (a choice),
    ``list[str]``, ``mapping`` (a nested model)."""
    import types
    import typing

    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(flow_text(arg) for arg in args)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join("null" if arg is type(None) else type_text(arg) for arg in args)
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_text(arg) for arg in args)}]"
    if annotation is typing.Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def flow_text(value: Any) -> str:
    """``value`` as YAML's flow style writes it, as a recipe would hold it: ``0.1``, ``null``, ``[a, b]``."""
    import re

    import yaml
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # plain where YAML reads the word back as this string, else double-quoted (JSON is valid YAML)
        plain = re.fullmatch(r"[A-Za-z_][\w./-]*", value) and yaml.safe_load(value) == value
        return value if plain else json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{flow_text(str(k))}: {flow_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(flow_text(item) for item in value) + "]"
    return json.dumps(str(value))
