"""Recipes: the schema assembled after plugins load, YAML and overrides, and validation.

The names below are imported on first use (PEP 562): validation loads the plugin registry, which imports
torch, and ``prefopt.recipe.examples`` (what ``prefopt init`` and ``prefopt list recipe`` read) must not.
"""

import importlib

_HOMES = {
    name: module
    for module, names in {
        "prefopt.recipe.load": ("apply_override", "build_algorithm", "build_loss", "check_prompt_only_data",
                                "dump_recipe", "load_recipe", "parse_override", "read_yaml", "validate_tree"),
        "prefopt.recipe.problems": ("format_problems",),
        "prefopt.recipe.schema": ("ENGINE_SECTIONS", "ColumnsConfig", "DataConfig", "EvalConfig", "LoraConfig",
                                  "ModelConfig", "OutputConfig", "ReferenceConfig", "Section", "SyncConfig",
                                  "TrainConfig", "recipe_model"),
        "prefopt.recipe.derive": ("derive_recipe",),
    }.items()
    for name in names
}

__all__ = [
    "ENGINE_SECTIONS", "ColumnsConfig", "DataConfig", "EvalConfig", "LoraConfig", "ModelConfig", "OutputConfig",
    "ReferenceConfig", "Section", "SyncConfig", "TrainConfig", "apply_override", "build_algorithm", "build_loss",
    "check_prompt_only_data", "derive_recipe", "dump_recipe", "format_problems", "load_recipe", "parse_override",
    "read_yaml", "recipe_model", "validate_tree",
]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'prefopt.recipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
