"""The training engine: ``setup`` -> ``fit`` -> ``finish``, on accelerate.

``setup`` (``setup.py``) builds everything a run needs from a recipe (model, data, loss, reference,
optimizer) and restores a checkpoint when there is one; ``fit`` (``loop.py``) runs the optimizer steps;
``finish`` (``outputs.py``) evaluates and saves the model. The engine never looks at a loss's name: it
asks what the loss declares it needs.
"""

from __future__ import annotations

from prefopt.engine.evaluation import evaluate_pairs, evaluate_task
from prefopt.engine.loop import fit, planned_pairs, process_micro_batches, step_pairs, train_step
from prefopt.engine.outputs import finish, save, save_model
from prefopt.engine.run import Run
from prefopt.engine.distributed import sharded_params
from prefopt.engine.scoring import forward_pairs
from prefopt.engine.setup import build_task_data, setup
from prefopt.recipe import build_algorithm
from prefopt.registry.loading import Plugins, default_plugins

__all__ = [
    "Run", "evaluate_pairs", "sharded_params", "evaluate_task", "finish", "fit", "forward_pairs", "planned_pairs",
    "process_micro_batches", "run", "save", "save_model", "setup", "build_task_data", "step_pairs", "train",
    "train_step",
]


def run(recipe, plugins: Plugins | None = None, *, show_progress: bool = True) -> dict:
    """What ``prefopt train`` does: the recipe's algorithm plugin, or one pass of the engine."""
    plugins = plugins or default_plugins()
    algorithm = build_algorithm(recipe, plugins)
    if algorithm is None:
        return train(recipe, plugins, show_progress=show_progress)
    return algorithm.run(recipe, plugins, show_progress=show_progress)


def train(recipe, plugins: Plugins | None = None, *, show_progress: bool = True, end_training: bool = True,
          **setup_options) -> dict:
    """Run a recipe end to end; returns the run summary (also written to ``<output.dir>/summary.json``).
    ``setup_options`` go to ``setup`` (``select_train``, ``data_model``); ``end_training`` to ``finish``."""
    run = setup(recipe, plugins, show_progress=show_progress, **setup_options)
    fit(run, show_progress=show_progress)
    return finish(run, end_training=end_training)
