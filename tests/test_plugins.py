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


def test_prefopt_list_shows_dpo_with_its_package_and_paper(capsys, installed):
    """`prefopt list` prints one row per plugin: kind, name, package (distribution and version), paper;
    then the summary on the next line."""
    from prefopt.cli import main
    from prefopt_plugins.losses.dpo import DPO

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (row,) = [i for i, line in enumerate(lines) if line.split()[:2] == ["loss", "dpo"]]
    provider = f"prefopt {importlib.metadata.version('prefopt')}"
    assert provider in lines[row]
    assert DPO.paper in lines[row]
    assert DPO.summary() in lines[row + 1]


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
