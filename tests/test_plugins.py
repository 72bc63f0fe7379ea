"""Plugin loading (``prefopt.registry.loading``), the registry's rules, the hookspecs, and ``prefopt list``.

Broken plugins are written as small modules under ``tmp_path`` (put on ``sys.path``) and loaded through
``PREFOPT_PLUGINS``, the same way a user names an uninstalled plugin module.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import sys
import textwrap
from pathlib import Path

import pydantic
import pytest

import prefopt.registry.hookspecs
from prefopt import PreferenceLoss
from prefopt.errors import PrefoptError
from prefopt.registry.loading import AUTOLOAD_OFF_ENV, EXTRA_PLUGINS_ENV, default_plugins, load_plugins

REPO = Path(__file__).resolve().parents[1]

TWIN_LOSS = """
import torch
from prefopt import LossConfig, LossOutput, PreferenceLoss, hookimpl

class TwinConfig(LossConfig):
    pass

class Twin(PreferenceLoss):
    '''A loss whose name another plugin also uses.'''
    name, Config, paper = {name!r}, TwinConfig, "arXiv:0000.00000"

    def __call__(self, lp):
        zero = lp.policy_chosen * 0
        return LossOutput(zero, zero.detach(), zero.detach())

@hookimpl
def prefopt_register_losses():
    return [Twin]
"""


@pytest.fixture(autouse=True)
def plugin_env(monkeypatch):
    """Start every test from the defaults: autoload on, no extra modules, no cached plugin set."""
    monkeypatch.delenv(AUTOLOAD_OFF_ENV, raising=False)
    monkeypatch.delenv(EXTRA_PLUGINS_ENV, raising=False)
    default_plugins.cache_clear()
    yield
    default_plugins.cache_clear()


@pytest.fixture()
def write_plugin(tmp_path, monkeypatch):
    """write_plugin(name, source) -> module name: a module importable for this test only."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def installed():
    """The plugins of this environment, loaded through the entry points as `prefopt` loads them
    (and nothing named by a PREFOPT_PLUGINS the shell may have set)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(EXTRA_PLUGINS_ENV, raising=False)
        return load_plugins(autoload=True)


# ----------------------------------------------------------------------------------------------------------
# Discovery


def test_builtin_dpo_comes_through_the_entry_point(installed):
    """dpo is registered by the `prefopt` distribution's entry point `dpo`, like any third-party plugin."""
    (entry_point,) = [ep for ep in importlib.metadata.entry_points(group="prefopt") if ep.name == "dpo"]
    assert entry_point.value == "prefopt_plugins.losses.dpo"
    assert entry_point.dist.name == "prefopt"

    (info,) = [i for i in installed.losses.infos() if i.name == "dpo"]
    assert info.provider == f"prefopt {importlib.metadata.version('prefopt')}"
    assert info.plugin == "dpo"  # the entry point's name
    assert info.cls.__module__ == "prefopt_plugins.losses.dpo"
    assert installed.losses.get("dpo") is info.cls


def test_disable_autoload_env_loads_no_entry_point(monkeypatch):
    """PREFOPT_DISABLE_PLUGIN_AUTOLOAD=1 loads nothing from entry points; PREFOPT_PLUGINS still adds modules,
    and they are reported as modules, not packages."""
    entry_point_names = {ep.name for ep in importlib.metadata.entry_points(group="prefopt")}
    assert "dpo" in entry_point_names
    monkeypatch.setenv(AUTOLOAD_OFF_ENV, "1")

    nothing = load_plugins()
    assert len(nothing.losses) == 0 and len(nothing.tasks) == 0
    assert nothing.manager.get_plugins() == set()

    monkeypatch.setenv(EXTRA_PLUGINS_ENV, "prefopt_plugins.losses.dpo")
    only_named = load_plugins()
    assert only_named.losses.names() == ["dpo"]
    assert only_named.losses.infos()[0].provider == "module prefopt_plugins.losses.dpo"
    registered = {name for name, _ in only_named.manager.list_name_plugin()}
    assert registered == {"prefopt_plugins.losses.dpo"}
    assert not registered & entry_point_names


# ----------------------------------------------------------------------------------------------------------
# Strict loading: every broken plugin is named


def test_duplicate_loss_name_names_both_plugins(write_plugin, monkeypatch):
    """Two modules both registering 'twin': the error names the first and the second, and says how out."""
    write_plugin("twin_alpha", TWIN_LOSS.format(name="twin"))
    write_plugin("twin_beta", TWIN_LOSS.format(name="twin"))
    monkeypatch.setenv(EXTRA_PLUGINS_ENV, "twin_alpha,twin_beta")

    with pytest.raises(PrefoptError) as err:
        load_plugins(autoload=False)
    message = str(err.value)
    assert "'twin'" in message and "registered twice" in message
    assert "twin_alpha" in message and "twin_beta" in message
    assert AUTOLOAD_OFF_ENV in message


def test_reusing_a_builtin_name_names_the_builtin_and_the_newcomer(write_plugin):
    """A plugin that also calls its loss 'dpo' clashes with the built-in one, which is named too."""
    write_plugin("my_dpo", TWIN_LOSS.format(name="dpo"))

    with pytest.raises(PrefoptError, match="registered twice") as err:
        load_plugins(autoload=False, extra=["prefopt_plugins.losses.dpo", "my_dpo"])
    assert "prefopt_plugins.losses.dpo" in str(err.value) and "my_dpo" in str(err.value)


def test_misspelt_hook_fails_at_load_naming_the_plugin(write_plugin, monkeypatch):
    """`prefopt_register_loss` (no s) matches no hookspec; check_pending turns that into a load error."""
    write_plugin(
        "typo_plugin",
        """
        from prefopt import hookimpl

        @hookimpl
        def prefopt_register_loss():
            return []
        """,
    )
    monkeypatch.setenv(EXTRA_PLUGINS_ENV, "typo_plugin")

    with pytest.raises(PrefoptError) as err:
        load_plugins(autoload=False)
    assert "typo_plugin" in str(err.value)
    assert "prefopt_register_loss" in str(err.value)


def test_module_that_fails_to_import_is_named(write_plugin, monkeypatch):
    """The error names the plugin module and the underlying exception, not a bare traceback."""
    write_plugin("broken_plugin", "import prefopt_no_such_dependency_xyz\n")
    monkeypatch.setenv(EXTRA_PLUGINS_ENV, "broken_plugin")

    with pytest.raises(PrefoptError) as err:
        load_plugins(autoload=False)
    message = str(err.value)
    assert "broken_plugin" in message
    assert "ModuleNotFoundError" in message and "prefopt_no_such_dependency_xyz" in message


def test_missing_plugin_module_is_named(monkeypatch):
    monkeypatch.setenv(EXTRA_PLUGINS_ENV, "prefopt_no_such_plugin_module")
    with pytest.raises(PrefoptError, match="prefopt_no_such_plugin_module"):
        load_plugins(autoload=False)


@pytest.mark.parametrize(
    "returned, expected",
    [
        ("NotALoss", "must be a subclass of prefopt.api.loss.PreferenceLoss"),
        ("DPO(DPO.Config())", "hooks return classes, not instances"),  # an instance, not a class
    ],
    ids=["plain-class", "instance"],
)
def test_registering_something_other_than_a_loss_class_is_an_error(write_plugin, monkeypatch, returned, expected):
    write_plugin(
        "wrong_kind_plugin",
        f"""
        from prefopt import hookimpl
        from prefopt_plugins.losses.dpo import DPO

        class NotALoss:
            name = "not_a_loss"

        @hookimpl
        def prefopt_register_losses():
            return [{returned}]
        """,
    )
    monkeypatch.setenv(EXTRA_PLUGINS_ENV, "wrong_kind_plugin")

    with pytest.raises(PrefoptError) as err:
        load_plugins(autoload=False)
    assert expected in str(err.value)
    assert "wrong_kind_plugin" in str(err.value)


CONTRACT_PLUGIN = """
from pydantic import BaseModel
from prefopt import LossConfig, LossOutput, PreferenceLoss, TaskConfig, hookimpl

class Broken(PreferenceLoss):
    '''A loss that breaks the plugin contract one way.'''
    name, paper = "broken", "arXiv:0000.00000"
    {body}

    def __call__(self, lp):
        return LossOutput(lp.policy_chosen, lp.policy_chosen.detach(), lp.policy_chosen.detach())

@hookimpl
def prefopt_register_losses():
    return [Broken]
"""


@pytest.mark.parametrize(
    "body, expected",
    [
        ("", "loss 'broken' (Broken) has no Config; set Config to a subclass of prefopt.api.loss.LossConfig"),
        ("Config = dict", "loss 'broken' (Broken) has Config = <class 'dict'>; set Config to a subclass of "
                          "prefopt.api.loss.LossConfig"),
        ("class Config(BaseModel):\n        beta: float = 0.1",
         "loss 'broken' (Broken) has Config = <class 'contract_plugin.Broken.Config'>; set Config to a subclass "
         "of prefopt.api.loss.LossConfig"),
        ("Config = TaskConfig", "has Config = <class 'prefopt.api.task.TaskConfig'>; set Config to a subclass of "
                                "prefopt.api.loss.LossConfig"),
        ("Config, name = LossConfig, 'my loss'", "Broken.name 'my loss' is not an identifier"),
        ("Config, name = LossConfig, '2dpo'", "Broken.name '2dpo' is not an identifier"),
        ("Config, name = LossConfig, None", "Broken has no string 'name'"),
    ],
    ids=["no-config", "config-not-a-class", "plain-pydantic-model", "another-kinds-config", "name-with-space",
         "name-starting-with-a-digit", "no-name"],
)
def test_a_class_breaking_the_plugin_contract_is_refused_at_load_naming_the_plugin(
        write_plugin, monkeypatch, body, expected):
    """A loss without a Config (or with one that is no LossConfig) would break the schema of every recipe, and a
    name that is not an identifier cannot be written in one: loading refuses both, naming the plugin module."""
    write_plugin("contract_plugin", CONTRACT_PLUGIN.format(body=body))
    monkeypatch.setenv(EXTRA_PLUGINS_ENV, "contract_plugin")

    with pytest.raises(PrefoptError) as err:
        load_plugins(autoload=False)
    message = str(err.value)
    assert message.startswith("plugin 'contract_plugin' (module contract_plugin)"), message
    assert expected in message
    assert "\n" not in message


def test_a_class_keeping_the_contract_is_registered():
    """The checks refuse only what breaks the contract: a loss whose Config is LossConfig itself (no options)
    registers."""
    from prefopt import LossConfig, LossOutput
    from prefopt.registry.loading import Registry

    class Fine(PreferenceLoss):
        """A loss that keeps the contract."""

        name, Config, paper = "fine_2", LossConfig, "arXiv:0000.00000"

        def __call__(self, lp):
            return LossOutput(lp.policy_chosen, lp.policy_chosen, lp.policy_chosen)

    registry = Registry("loss", PreferenceLoss, LossConfig)
    registry.add(Fine, "test", "test")
    assert registry.get("fine_2") is Fine


# ----------------------------------------------------------------------------------------------------------
# One table of plugin kinds


def test_the_table_of_kinds_matches_the_hookspecs_and_the_registries(installed):
    """Every hookspec registers one kind of KINDS, and Plugins has exactly one registry per kind, in its order;
    every kind's base is a Plugin, its config base a PluginConfig that forbids unknown keys and is frozen."""
    import dataclasses

    from prefopt.api.plugin import Plugin, PluginConfig
    from prefopt.registry.kinds import KINDS

    assert {kind.hook for kind in KINDS} == set(hookspecs())
    fields = [f.name for f in dataclasses.fields(installed) if f.name != "manager"]
    assert fields == [kind.attribute for kind in KINDS]
    for kind, registry in zip(KINDS, installed.registries()):
        assert registry.kind == kind.name and registry.base is kind.base and registry.config_base is kind.config_base
        assert issubclass(kind.base, Plugin) and issubclass(kind.config_base, PluginConfig)
        assert kind.config_base.model_config.get("extra") == "forbid" and kind.config_base.model_config.get("frozen")
        for info in registry.infos():
            assert issubclass(info.cls, kind.base) and issubclass(info.cls.Config, kind.config_base)
    assert [k.recipe_key for k in KINDS if k.in_schema] == ["loss", "data.task", "algorithm"]


def test_prefopt_list_shows_every_kind_in_the_tables_order(capsys, installed):
    from prefopt.cli import main
    from prefopt.registry.kinds import KINDS

    assert main(["list"]) == 0
    kind, found = None, []
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  "):
            found.append((kind, line.split()[0]))
        elif line.split()[1:2] and line.split()[1].startswith("("):  # a kind's heading: "loss (31; ..."
            kind = line.split()[0]
    assert found == [(kind.name, name) for kind in KINDS for name in installed.registry(kind).names()]


# ----------------------------------------------------------------------------------------------------------
# What every registered loss must carry


def test_every_registered_loss_is_documented(installed):
    """Each loss: a name, a paper citing arXiv, a one-line summary (first docstring line, then a blank
    line), a Config that forbids unknown keys, and a description on every Config field.
    All problems are collected and reported at once."""
    assert len(installed.losses) >= 1
    problems: list[str] = []
    for info in installed.losses.infos():
        cls, where = info.cls, f"{info.name} ({info.provider})"
        if not (issubclass(cls, PreferenceLoss) and cls.name == info.name and cls.name.isidentifier()):
            problems.append(f"{where}: name {cls.name!r} is not a plain identifier")
        paper = getattr(cls, "paper", "")
        if not (isinstance(paper, str) and paper.strip() and "arXiv" in paper):
            problems.append(f"{where}: paper {paper!r} does not cite an arXiv id")
        doc_lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
        if not doc_lines or not doc_lines[0].strip():
            problems.append(f"{where}: no docstring summary")
        elif len(doc_lines) > 1 and doc_lines[1].strip():
            problems.append(f"{where}: the summary runs onto a second line: {doc_lines[1]!r}")
        elif cls.summary() != doc_lines[0].strip():
            problems.append(f"{where}: summary() is {cls.summary()!r}")
        config = cls.Config
        if config.model_config.get("extra") != "forbid":
            problems.append(f"{where}: Config does not forbid extra keys")
        try:
            config(prefopt_not_an_option=1)
            problems.append(f"{where}: Config accepted an unknown key")
        except pydantic.ValidationError:
            pass
        for field_name, field in config.model_fields.items():
            if not (field.description or "").strip():
                problems.append(f"{where}: Config.{field_name} has no description")
    assert not problems, "\n".join(problems)


def test_prefopt_list_and_show_give_dpo_with_its_package_and_paper(capsys, installed):
    """`prefopt list` prints one row per plugin: name, the paper's arXiv id, summary; `prefopt show loss dpo`
    the whole citation and the package (distribution and version) it comes from."""
    from prefopt.cli import main
    from prefopt_plugins.losses.dpo import DPO

    assert main(["list"]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["dpo"]]
    assert row.split()[1] == "arXiv:2305.18290"
    assert len(row) <= 100 and DPO.summary()[:40] in row  # the summary, cut to fit 100 columns
    assert main(["show", "loss", "dpo"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert f"package prefopt {importlib.metadata.version('prefopt')} (module prefopt_plugins.losses.dpo)" in shown
    assert f"paper {DPO.paper}" in shown


# ----------------------------------------------------------------------------------------------------------
# Hookspecs


def hookspecs() -> dict[str, object]:
    """Every function in prefopt.registry.hookspecs marked as a hookspec (pluggy sets `<project>_spec` on it)."""
    return {
        name: fn
        for name, fn in inspect.getmembers(prefopt.registry.hookspecs, inspect.isfunction)
        if hasattr(fn, "prefopt_spec")
    }


def test_hookspecs_are_prefixed_and_versioned():
    specs = hookspecs()
    assert "prefopt_register_losses" in specs
    public = {n for n, fn in inspect.getmembers(prefopt.registry.hookspecs, inspect.isfunction)
              if fn.__module__ == prefopt.registry.hookspecs.__name__ and not n.startswith("_")}
    assert public == set(specs), f"functions in hookspecs.py that are not hookspecs: {public - set(specs)}"
    for name, fn in specs.items():
        assert name.startswith("prefopt_"), name
        assert fn.__doc__ and ".. versionadded::" in fn.__doc__, f"{name} has no versionadded note"


def test_every_hookspec_is_named_in_the_readme():
    readme = REPO / "README.md"
    assert readme.is_file(), f"{readme} does not exist"
    text = readme.read_text(encoding="utf-8")
    missing = [name for name in hookspecs() if name not in text]
    assert not missing, f"hooks not mentioned in README.md: {missing}"


# ----------------------------------------------------------------------------------------------------------
# Plugins code against the public core only, and never against each other


def plugin_module(path: Path) -> str:
    """The dotted name a file under plugins/ is imported as: plugins/losses/dpo.py -> prefopt_plugins.losses.dpo."""
    parts = path.relative_to(REPO / "plugins").with_suffix("").parts
    return ".".join(("prefopt_plugins", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in ``path``, relative ones resolved, function-level
    ones included; ``from package import module`` counts as importing ``package.module``."""
    import ast

    package = plugin_module(path) if path.name == "__init__.py" else plugin_module(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, *([module] if module else [])])
            names = []
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                as_file = REPO / "plugins" / Path(*submodule.split(".")[1:])
                if module.startswith("prefopt_plugins") and as_file.with_suffix(".py").is_file():
                    found.append((node.lineno, submodule, []))
                else:
                    names.append(alias.name)
            if names:
                found.append((node.lineno, module, names))
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))  # __version__ is public


def test_plugins_import_only_public_core_names_and_no_other_plugin():
    """A plugin imports no ``prefopt`` name or module starting with ``_``, and no other plugin's module: plugins
    share code through public core helpers (``prefopt.__all__``), so each one can be moved, replaced or dropped
    alone. A plugin's own modules may import each other: the submodules of a package plugin (the sentiment
    task), and a helper module that is no plugin (no entry point) and that only one plugin imports (sapo_parts
    of sapo)."""
    files = {plugin_module(path): path for path in sorted((REPO / "plugins").rglob("*.py"))}
    entry_points = {ep.value.split(":")[0] for ep in importlib.metadata.entry_points(group="prefopt")
                    if ep.dist is not None and ep.dist.name == "prefopt"}
    assert "prefopt_plugins.losses.dpo" in entry_points

    def plugin_of(module: str) -> str | None:
        """The entry point ``module`` is, or is a submodule of; None for a helper module."""
        return max((ep for ep in entry_points if module == ep or module.startswith(ep + ".")), key=len, default=None)

    helper_users: dict[str, set[str | None]] = {}  # helper module -> the plugins of the files that import it
    for module, path in files.items():
        for _, imported, _ in imports_of(path):
            if imported.startswith("prefopt_plugins.") and plugin_of(imported) is None:
                helper_users.setdefault(imported, set()).add(plugin_of(module))

    def owner(module: str) -> str | None:
        users = helper_users.get(module, set())
        return plugin_of(module) or (next(iter(users)) if len(users) == 1 else None)

    def same_plugin(imported: str, module: str) -> bool:
        return owner(imported) is not None and owner(imported) == owner(module)

    problems = []
    for module, path in files.items():
        where = path.relative_to(REPO)
        for line, imported, names in imports_of(path):
            if imported == "prefopt" or imported.startswith("prefopt."):
                private = [part for part in [*imported.split("."), *names] if is_private(part)]
                if private:
                    problems.append(f"{where}:{line}: imports private {', '.join(private)} from {imported}")
            elif imported.startswith("prefopt_plugins.") and not same_plugin(imported, module):
                problems.append(f"{where}:{line}: imports another plugin's module {imported}")
    assert not problems, "plugins must use public core helpers instead:\n" + "\n".join(problems)
