"""Recipes: the schema assembled after plugins load, YAML and overrides, and validation."""

from prefopt.recipe.schema import (
    ENGINE_SECTIONS, ColumnsConfig, DataConfig, EvalConfig, LoraConfig, ModelConfig, OutputConfig, ReferenceConfig,
    Section, SyncConfig, TrainConfig, apply_override, build_algorithm, build_loss, check_prompt_only_data,
    dump_recipe, load_recipe, parse_override, read_yaml, recipe_model, validate_tree,
)

__all__ = [
    "ENGINE_SECTIONS", "ColumnsConfig", "DataConfig", "EvalConfig", "LoraConfig", "ModelConfig", "OutputConfig",
    "ReferenceConfig", "Section", "SyncConfig", "TrainConfig", "apply_override", "build_algorithm", "build_loss",
    "check_prompt_only_data", "dump_recipe", "load_recipe", "parse_override", "read_yaml", "recipe_model",
    "validate_tree",
]
