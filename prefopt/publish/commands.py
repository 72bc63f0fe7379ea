"""``prefopt push RUN_DIR REPO_ID [--private] [--revision R] [--token-env VAR]``: a finished run's model, with
its model card, to the Hugging Face Hub, as ``output.push_to_hub`` does at the end of a run.

Only a complete model that prefopt wrote is pushed: ``RUN_DIR/model`` with prefopt's marker (so the folder
was put in place whole), its config and safetensors weights. The card's loading snippet is pointed at
``REPO_ID`` first; a model saved before cards existed gets one, written from the run's ``recipe.yaml`` and
``summary.json``. The run directory is locked while the folder uploads, so a run cannot replace it meanwhile.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefopt.errors import PrefoptError

__all__ = ["add_parser", "check_model_folder", "run"]


def add_parser(subcommands) -> argparse.ArgumentParser:
    """Add ``push`` to the ``prefopt`` command's subcommands (``argparse``'s ``add_subparsers()``)."""
    help = "Push a finished run's model, with its model card, to the Hugging Face Hub."
    sub = subcommands.add_parser("push", help=help, description=help)
    sub.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's directory (its output.dir), holding model/")
    sub.add_argument("repo_id", metavar="REPO_ID", help="the hub repository, owner/name; created when missing")
    sub.add_argument("--private", action="store_true", help="create the repository private")
    sub.add_argument("--revision", metavar="R", help="branch to push to, created from main when missing (default main)")
    sub.add_argument("--token-env", metavar="VAR",
                     help="environment variable holding a write token (default: HF_TOKEN, else the saved hub login)")
    return sub


def run(args) -> int:
    from prefopt.locks import lock_run_dir, release_run_dir
    from prefopt.publish.card import CARD_NAME, use_repo_id
    from prefopt.publish.hub import check_repo_id, push_folder, token_from_env

    run_dir = Path(args.run_dir)
    try:
        check_repo_id(args.repo_id)
    except ValueError as exc:
        raise PrefoptError(f"REPO_ID: {exc}") from None
    model_dir = check_model_folder(run_dir)
    token = token_from_env(args.token_env, "--token-env")
    lock_run_dir(run_dir, print)  # no run may replace model/ while it uploads
    try:
        card = model_dir / CARD_NAME
        if card.is_file():
            use_repo_id(card, args.repo_id)
        else:
            write_missing_card(run_dir, model_dir, args.repo_id)
        url = push_folder(model_dir, args.repo_id, private=args.private, revision=args.revision, token=token)
    finally:
        release_run_dir(run_dir)
    print(f"pushed {model_dir} to {args.repo_id}: {url}")
    return 0


def check_model_folder(run_dir: Path) -> Path:
    """``run_dir/model`` when it is a complete model prefopt wrote; else a one-line error saying what is not."""
    from prefopt.engine.markers import MARKER_NAME, is_marked

    model_dir = run_dir / "model"
    if not run_dir.is_dir():
        raise PrefoptError(f"RUN_DIR {run_dir}: no such directory; give a run's output.dir")
    if not model_dir.is_dir():
        raise PrefoptError(f"{run_dir} holds no model/: the run has not finished, or ran with output.save_model: "
                           "false; finish it with `prefopt train` on its recipe")
    if not is_marked(model_dir, "model"):
        raise PrefoptError(f"{model_dir} was not written by prefopt (no {MARKER_NAME} marker of a model); push "
                           "only a model a finished prefopt run saved")
    configs = [name for name in ("config.json", "adapter_config.json") if (model_dir / name).is_file()]
    if not configs or not any(model_dir.glob("*.safetensors")):
        raise PrefoptError(f"{model_dir} is incomplete (no config.json or adapter_config.json, or no .safetensors "
                           "weights); train the run again to save its model")
    return model_dir


def write_missing_card(run_dir: Path, model_dir: Path, repo_id: str) -> None:
    """A model card for a model saved before prefopt wrote cards, from the run's ``recipe.yaml`` and
    ``summary.json``; a run without them is pushed without a card, with a note."""
    from prefopt.publish.card import gather_facts, write_card
    from prefopt.recipe import load_recipe
    from prefopt.registry.loading import default_plugins

    recipe_file, summary_file = run_dir / "recipe.yaml", run_dir / "summary.json"
    if not recipe_file.is_file():
        print(f"note: {model_dir} has no model card and {run_dir} no recipe.yaml to write one from; pushing "
              "without a card")
        return
    plugins = default_plugins()
    recipe = load_recipe(recipe_file, plugins=plugins)
    try:
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    except ValueError:  # a damaged summary leaves the metrics out of the card, not the card out of the push
        summary = {}
    facts = gather_facts(recipe, plugins.losses.get(recipe.loss.name), summary, run_dir,
                         adapter=(model_dir / "adapter_config.json").is_file(), model_id=repo_id, plugins=plugins)
    write_card(model_dir, facts)
