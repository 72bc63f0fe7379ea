"""Recipes: the schema assembled after plugins load, YAML and overrides, and validation."""

from prefopt.recipe.load import (
    apply_override, build_algorithm, build_loss, check_prompt_only_data, dump_recipe, load_recipe, parse_override,
    read_yaml, validate_tree,
)
from prefopt.recipe.problems import format_problems
from prefopt.recipe.schema import (
    ENGINE_SECTIONS, ColumnsConfig, DataConfig, EvalConfig, LoraConfig, ModelConfig, OutputConfig, ReferenceConfig,
    Section, SyncConfig, TrainConfig, recipe_model,
)
from prefopt.recipe.derive import derive_recipe

__all__ = [
    "ENGINE_SECTIONS", "ColumnsConfig", "DataConfig", "EvalConfig", "LoraConfig", "ModelConfig", "OutputConfig",
    "ReferenceConfig", "Section", "SyncConfig", "TrainConfig", "apply_override", "build_algorithm", "build_loss",
    "check_prompt_only_data", "derive_recipe", "dump_recipe", "format_problems", "load_recipe", "parse_override",
    "read_yaml", "recipe_model", "validate_tree",
]
