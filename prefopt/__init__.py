"""prefopt: DPO-family preference optimization, one engine and a zoo of loss plugins.

The public API is what a plugin author needs; everything else is reached through the CLI or the
modules themselves.
"""

from .algorithm import Algorithm, AlgorithmConfig
from .judging import Choice, Judge, JudgeConfig, JudgeContext, PairwiseJudge, ScoreJudge
from .loss import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards
from .plugins import hookimpl
from .sampling import Sample, Sampler, SamplerConfig, SamplerContext
from .task import Task, TaskConfig, TaskContext, TaskData

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
