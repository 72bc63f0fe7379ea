"""prefopt: DPO-family preference optimization, one engine and a zoo of loss plugins.

The public API is what a plugin author needs; everything else is reached through the CLI or the
modules themselves.
"""

from prefopt.api.algorithm import Algorithm, AlgorithmConfig
from prefopt.api.judge import Choice, Judge, JudgeConfig, JudgeContext, PairwiseJudge, ScoreJudge
from prefopt.api.loss import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards
from prefopt.registry.loading import hookimpl
from prefopt.api.sampler import Sample, Sampler, SamplerConfig, SamplerContext
from prefopt.api.task import Task, TaskConfig, TaskContext, TaskData

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
    "dpo_rewards",
    "hookimpl",
]
