"""prefopt: DPO-family preference optimization, one engine and a zoo of loss plugins.

``__all__`` below is the whole public API, in two parts:

- for users: ``load_recipe`` (a recipe file or dict, validated as ``prefopt validate`` validates it),
  ``train`` (a run, returning a ``TrainResult``), ``Callback`` (called for every metrics record a run
  writes), ``PrefoptError`` (every problem a user can fix; ``RecipeError`` and ``NonFiniteError`` subclass
  it) and ``__version__``;
- for plugin authors: the base classes and configs of each kind of plugin, ``hookimpl``, and the helpers
  plugins share (``dpo_rewards``, ``pad_token_ids``, ``derive_recipe``, ``format_problems``, ...), among them
  judged evaluation: a model's completions sampled reproducibly (``sample_completions``) and scored by any
  scorer, with their length and KL (``judge_completions``), which a task's ``evaluate`` is built on.

The plugin contracts these come from (``prefopt.api.*``) and the plugin test kit (``prefopt.testing``) are
public too; every other submodule is internal and may change without notice.

Importing ``prefopt`` imports no torch: every name is imported on first use (PEP 562), so the command line
starts fast and ``prefopt --help`` answers at once.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it, imported when the name is first read
_HOMES = {
    name: module
    for module, names in {
        "prefopt.api.algorithm": ("Algorithm", "AlgorithmConfig", "Phase", "PhaseContext", "PluginSpec",
                                  "plugin_config"),
        "prefopt.api.callbacks": ("Callback",),
        "prefopt.api.judge": ("Choice", "Judge", "JudgeConfig", "JudgeContext", "PairwiseJudge", "ScoreJudge"),
        "prefopt.api.loss": ("LossConfig", "LossOutput", "PairLogps", "PreferenceLoss", "chosen_nll_per_pair",
                             "dpo_rewards"),
        "prefopt.api.plugin": ("Plugin", "PluginConfig"),
        "prefopt.api.run": ("TrainResult", "load_recipe", "train"),
        "prefopt.api.sampler": ("Sample", "Sampler", "SamplerConfig", "SamplerContext", "derive_seed",
                                "eos_token_ids"),
        "prefopt.api.task": ("Task", "TaskConfig", "TaskContext", "TaskData"),
        "prefopt.errors": ("NonFiniteError", "PrefoptError", "RecipeError"),
        "prefopt.forward.batching": ("pad_token_ids",),
        "prefopt.judged.evaluate": ("JudgedEval", "JudgedOptions", "JudgedRecord", "judge_completions"),
        "prefopt.judged.sampling": ("Completion", "ModelSampler", "model_eos_ids", "model_sampler",
                                    "sample_completions", "sample_prompt_ids"),
        "prefopt.recipe.derive": ("derive_recipe",),
        "prefopt.recipe.problems": ("format_problems",),
        "prefopt.registry.loading": ("hookimpl",),
    }.items()
    for name in names
}

__all__ = [
    # using prefopt
    "Callback",
    "NonFiniteError",
    "PrefoptError",
    "RecipeError",
    "TrainResult",
    "__version__",
    "load_recipe",
    "train",
    # writing plugins
    "Algorithm",
    "AlgorithmConfig",
    "Choice",
    "Completion",
    "Judge",
    "JudgeConfig",
    "JudgeContext",
    "JudgedEval",
    "JudgedOptions",
    "JudgedRecord",
    "LossConfig",
    "LossOutput",
    "ModelSampler",
    "PairLogps",
    "PairwiseJudge",
    "Phase",
    "PhaseContext",
    "Plugin",
    "PluginConfig",
    "PluginSpec",
    "PreferenceLoss",
    "Sample",
    "Sampler",
    "SamplerConfig",
    "SamplerContext",
    "ScoreJudge",
    "Task",
    "TaskConfig",
    "TaskContext",
    "TaskData",
    "chosen_nll_per_pair",
    "derive_recipe",
    "derive_seed",
    "dpo_rewards",
    "eos_token_ids",
    "format_problems",
    "hookimpl",
    "judge_completions",
    "model_eos_ids",
    "model_sampler",
    "pad_token_ids",
    "plugin_config",
    "sample_completions",
    "sample_prompt_ids",
]


def __getattr__(name: str):
    if name == "__version__":
        value = _version()
    elif name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    else:
        raise AttributeError(f"module 'prefopt' has no attribute {name!r}")
    globals()[name] = value  # read once: later reads are plain attribute lookups
    return value


def _version() -> str:
    """The installed distribution's version; in a source tree that is not installed, pyproject.toml's."""
    import importlib.metadata

    try:
        return importlib.metadata.version("prefopt")
    except importlib.metadata.PackageNotFoundError:
        pass
    import re
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
    return found.group(1) if found else "0+unknown"


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
