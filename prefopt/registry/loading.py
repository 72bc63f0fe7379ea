"""Plugin loading: entry points in group ``prefopt``, strict checks, and one registry per plugin kind.

Built-in plugins come through the same entry-point door as third-party ones. Set
``PREFOPT_DISABLE_PLUGIN_AUTOLOAD=1`` to load no entry points (reproducible runs), and
``PREFOPT_PLUGINS=module[,module...]`` to register exactly those modules in addition.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import re
from dataclasses import dataclass
from typing import Generic, TypeVar

import pluggy
from pydantic import BaseModel

from prefopt.api.algorithm import Algorithm
from prefopt.api.judge import Judge
from prefopt.api.loss import PreferenceLoss
from prefopt.api.plugin import PluginConfig
from prefopt.api.sampler import Sampler
from prefopt.api.task import Task
from prefopt.errors import PrefoptError, did_you_mean
from prefopt.registry import hookspecs
from prefopt.registry.kinds import KINDS, PluginKind

GROUP = "prefopt"
AUTOLOAD_OFF_ENV = "PREFOPT_DISABLE_PLUGIN_AUTOLOAD"
EXTRA_PLUGINS_ENV = "PREFOPT_PLUGINS"

hookimpl = pluggy.HookimplMarker(GROUP)

# A plugin's name is a recipe value and a key of metrics and file names: a plain ASCII identifier.
PLUGIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

T = TypeVar("T")


@dataclass(frozen=True)
class PluginInfo(Generic[T]):
    """One registered class and where it came from."""

    kind: str
    name: str
    cls: type[T]
    provider: str  # the distribution (package) that registered it, or the module for PREFOPT_PLUGINS
    plugin: str  # the plugin module's registered name


class Registry(Generic[T]):
    """name -> class for one kind of plugin. A class that breaks its kind's contract, or a name registered
    twice, is an error naming the plugin (both providers, for a name)."""

    def __init__(self, kind: str, base: type[T], config_base: type[BaseModel] = PluginConfig) -> None:
        """``kind`` names one in messages ("loss"); every class added subclasses ``base`` and has a ``Config``
        subclassing ``config_base`` (``load_plugins`` passes each kind's own, from ``KINDS``)."""
        self.kind, self.base, self.config_base = kind, base, config_base
        self._by_name: dict[str, PluginInfo[T]] = {}

    def add(self, cls: type, provider: str, plugin: str) -> None:
        refusal = self._refusal(cls, f"plugin {plugin!r} ({provider})")
        if refusal:
            raise PrefoptError(refusal)
        name = cls.name
        if name in self._by_name:
            first = self._by_name[name]
            raise PrefoptError(
                f"{self.kind} name {name!r} is registered twice: by {first.plugin!r} ({first.provider}) "
                f"and by {plugin!r} ({provider}); uninstall one or disable autoload with {AUTOLOAD_OFF_ENV}=1"
            )
        self._by_name[name] = PluginInfo(self.kind, name, cls, provider, plugin)

    def _refusal(self, cls: type, plugin: str) -> str | None:
        """Why ``cls`` cannot be a plugin of this kind, naming ``plugin`` (who registered it), or None. Checked
        when plugins load: a class without a usable ``name`` or ``Config`` would otherwise break the schema of
        every recipe, naming nothing."""
        if not isinstance(cls, type):
            return f"{plugin} registered an instance, {cls!r}; hooks return classes, not instances"
        if not issubclass(cls, self.base):
            return (f"{plugin} registered {cls!r} as a {self.kind}, but a {self.kind} must be a subclass of "
                    f"{_dotted(self.base)}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            return f"{plugin}: {cls.__qualname__} has no string 'name'"
        if not PLUGIN_NAME.fullmatch(name):
            return (f"{plugin}: {cls.__qualname__}.name {name!r} is not an identifier; recipes name a {self.kind} "
                    "with letters, digits and '_', not starting with a digit")
        config = getattr(cls, "Config", None)
        if not (isinstance(config, type) and issubclass(config, self.config_base)):
            found = "has no Config" if config is None else f"has Config = {config!r}"
            return (f"{plugin}: {self.kind} {name!r} ({cls.__qualname__}) {found}; set Config to a subclass of "
                    f"{_dotted(self.config_base)}, the model of its options")
        return None

    def get(self, name: str) -> type[T]:
        try:
            return self._by_name[name].cls
        except KeyError:
            raise PrefoptError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self._by_name)}; "
                f"`prefopt list` shows the registered ones"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def infos(self) -> list[PluginInfo[T]]:
        return [self._by_name[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)


@dataclass(frozen=True)
class Plugins:
    """Everything the loaded plugins registered, one registry per kind (a field per row of ``KINDS``)."""

    manager: pluggy.PluginManager
    losses: Registry[PreferenceLoss]
    tasks: Registry[Task]
    algorithms: Registry[Algorithm]
    samplers: Registry[Sampler]
    judges: Registry[Judge]

    def registry(self, kind: PluginKind) -> Registry:
        return getattr(self, kind.attribute)

    def registries(self) -> list[Registry]:
        """Every registry, in the order of ``KINDS``."""
        return [self.registry(kind) for kind in KINDS]


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=GROUP), key=lambda ep: ep.name)


def _register_module(pm: pluggy.PluginManager, name: str, module_path: str, provider: str) -> None:
    try:
        module = importlib.import_module(module_path)
    except Exception as exc:  # a broken plugin must be named, not surface as a bare ImportError
        raise PrefoptError(
            f"plugin {name!r} from {provider} failed to import {module_path!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if pm.is_registered(module):
        return
    pm.register(module, name=name)


def load_plugins(autoload: bool | None = None, extra: list[str] | None = None) -> Plugins:
    """Load entry-point plugins (unless disabled) and the modules in ``extra``/``PREFOPT_PLUGINS``."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    if autoload is None:
        autoload = os.environ.get(AUTOLOAD_OFF_ENV, "").strip().lower() not in ("1", "true", "yes", "on")
    providers: dict[str, str] = {}
    if autoload:
        for ep in _entry_points():
            provider = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown package"
            _register_module(pm, ep.name, ep.value, provider)
            providers[ep.name] = provider
    env_extra = [m.strip() for m in os.environ.get(EXTRA_PLUGINS_ENV, "").split(",") if m.strip()]
    for module_path in [*(extra or []), *env_extra]:
        _register_module(pm, module_path, module_path, f"module {module_path}")
        providers.setdefault(module_path, f"module {module_path}")
    try:
        pm.check_pending()  # a misspelt hook name fails here, at load, naming the plugin
    except pluggy.PluginValidationError as exc:
        raise PrefoptError(f"plugin {pm.get_name(exc.plugin)!r} is invalid: {exc}") from exc

    plugins = Plugins(pm, **{kind.attribute: Registry(kind.name, kind.base, kind.config_base) for kind in KINDS})
    for kind in KINDS:
        for impl in getattr(pm.hook, kind.hook).get_hookimpls():
            for cls in impl.function() or []:
                plugins.registry(kind).add(cls, providers.get(impl.plugin_name, impl.plugin_name), impl.plugin_name)
    return plugins


@functools.lru_cache(maxsize=1)
def default_plugins() -> Plugins:
    """The plugins for this process, loaded once."""
    return load_plugins()
