"""prefopt: DPO-family preference optimization, one engine and a zoo of loss plugins.

The public API is what a plugin author needs; everything else is reached through the CLI or the
modules themselves.
"""

from .algorithm import Algorithm, AlgorithmConfig
from .loss import LossConfig, LossOutput, PairLogps, PreferenceLoss, dpo_rewards
from .plugins import hookimpl
from .task import Task, TaskConfig, TaskContext, TaskData

__version__ = "0.1.0"

__all__ = [
    "Algorithm",
    "AlgorithmConfig",
    "LossConfig",
    "LossOutput",
    "PairLogps",
    "PreferenceLoss",
    "Task",
    "TaskConfig",
    "TaskContext",
    "TaskData",
    "__version__",
    "dpo_rewards",
    "hookimpl",
]
