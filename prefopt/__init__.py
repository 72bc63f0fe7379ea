"""prefopt: DPO-family preference optimization, one engine and a zoo of loss plugins.

The public API is what a plugin author needs; everything else is reached through the CLI or the
modules themselves.
"""

from prefopt.api.algorithm import Algorithm, AlgorithmConfig, Phase, PhaseContext, PluginSpec, plugin_config
from prefopt.api.judge import Choice, Judge, JudgeConfig, JudgeContext, PairwiseJudge, ScoreJudge
from prefopt.api.loss import LossConfig, LossOutput, PairLogps, PreferenceLoss, chosen_nll_per_pair, dpo_rewards
from prefopt.api.plugin import Plugin, PluginConfig
from prefopt.registry.loading import hookimpl
from prefopt.api.sampler import Sample, Sampler, SamplerConfig, SamplerContext, derive_seed, eos_token_ids
from prefopt.api.task import Task, TaskConfig, TaskContext, TaskData
from prefopt.forward.batching import pad_token_ids
from prefopt.recipe.derive import derive_recipe
from prefopt.recipe.problems import format_problems

__version__ = "0.1.0"

__all__ = [
    "Algorithm",
    "AlgorithmConfig",
    "Choice",
    "Judge",
    "JudgeConfig",
    "JudgeContext",
    "LossConfig",
    "LossOutput",
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
    "__version__",
    "chosen_nll_per_pair",
    "derive_recipe",
    "derive_seed",
    "dpo_rewards",
    "eos_token_ids",
    "format_problems",
    "hookimpl",
    "pad_token_ids",
    "plugin_config",
]
