"""The training engine: ``setup`` -> ``fit`` -> ``finish``, on accelerate.

``setup`` (``setup.py``) builds everything a run needs from a recipe (model, data, loss, reference,
optimizer) and restores a checkpoint when there is one; ``fit`` (``loop.py``) runs the optimizer steps;
``finish`` (``outputs.py``) evaluates and saves the model. The engine never looks at a loss's name: it
asks what the loss declares it needs. An algorithm plugin steers a run through a ``prefopt.Phase`` it
passes to ``setup`` or ``train``, whose hooks the loop calls.
"""

from __future__ import annotations

from prefopt.api.algorithm import Phase
from prefopt.engine.evaluation import evaluate_pairs, evaluate_task
from prefopt.engine.loop import fit, planned_pairs, process_micro_batches, step_pairs, train_step
from prefopt.engine.outputs import finish, save, save_model
from prefopt.engine.run import Run
from prefopt.engine.distributed import sharded_params
from prefopt.engine.scoring import forward_pairs
from prefopt.engine.setup import build_task_data, setup
from prefopt.errors import PrefoptError
from prefopt.recipe import build_algorithm
from prefopt.registry.loading import Plugins, default_plugins

__all__ = [
    "Run", "evaluate_pairs", "sharded_params", "evaluate_task", "finish", "fit", "forward_pairs", "planned_pairs",
    "process_micro_batches", "run", "save", "save_model", "setup", "build_task_data", "step_pairs", "train",
    "train_step",
]


def run(recipe, plugins: Plugins | None = None, *, show_progress: bool = True, resume_from=None) -> dict:
    """What ``prefopt train`` does: the recipe's algorithm plugin, or one pass of the engine. ``resume_from``
    names a checkpoint folder to continue (``--resume-from``), for a recipe without an algorithm."""
    plugins = plugins or default_plugins()
    algorithm = build_algorithm(recipe, plugins)
    if algorithm is None:
        return train(recipe, plugins, show_progress=show_progress, resume_from=resume_from)
    if resume_from is not None:
        raise PrefoptError(
            f"--resume-from: this recipe runs algorithm {recipe.algorithm.name!r}, whose runs resume on their own "
            "from their newest checkpoints in output.dir; rerun without --resume-from"
        )
    return algorithm.run(recipe, plugins, show_progress=show_progress)


def train(recipe, plugins: Plugins | None = None, *, phase: Phase | None = None, show_progress: bool = True,
          end_training: bool = True, resume_from=None) -> dict:
    """Run a recipe end to end; returns the run summary (also written to ``<output.dir>/summary.json``).
    ``phase`` is what an algorithm changes in the run (see ``prefopt.Phase``), closed when the run ends
    however it ends; ``end_training=False`` keeps the process group for an algorithm's next run;
    ``resume_from`` names the checkpoint folder to continue instead of ``output.dir``'s newest."""
    phase = phase or Phase()
    try:
        built = setup(recipe, plugins, phase=phase, show_progress=show_progress, resume_from=resume_from)
        fit(built, show_progress=show_progress)
        return finish(built, end_training=end_training)
    finally:
        phase.close()
