"""Pushing a saved model folder to the Hugging Face Hub: the repository created when missing, then the folder
uploaded in one commit, its model card included.

Used at the end of a run whose recipe sets ``output.push_to_hub`` and by ``prefopt push RUN_DIR REPO_ID``.
What the hub refuses or cannot be reached for (no token, a token without write access, no network,
``HF_HUB_OFFLINE=1``) is one line naming the repository and what to check, never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefopt.errors import PrefoptError

__all__ = ["check_repo_id", "push_folder", "token_from_env"]


def check_repo_id(repo_id: str) -> None:
    """Raise ValueError when ``repo_id`` is not ``name`` or ``owner/name`` as the hub spells them."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"{repo_id!r} is not a hub repository id: {str(exc).split(': ')[0]}") from None


def token_from_env(token_env: str | None, key: str) -> str | None:
    """The token in the environment variable ``token_env`` (None: huggingface_hub finds its own, ``HF_TOKEN``
    or the saved login); ``key`` names the setting in the error when that variable is unset."""
    if token_env is None:
        return None
    token = os.environ.get(token_env, "").strip()
    if not token:
        raise PrefoptError(f"{key} is {token_env!r}, but the environment variable {token_env} is not set; export "
                           f"it with a write token, or drop {key} to use HF_TOKEN or the saved hub login")
    return token


def push_folder(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                token: str | None = None, commit_message: str = "Upload model trained with prefopt") -> str:
    """Create ``repo_id`` (kept as it is when it exists) and the branch ``revision`` (from main, when missing),
    then upload ``folder`` to it in one commit; returns the commit's URL."""
    from huggingface_hub import HfApi

    from prefopt.engine.markers import MARKER_NAME

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, repo_type="model", branch=revision, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                   commit_message=commit_message,
                                   # prefopt's marker tells local folders prefopt wrote; it means nothing on the hub
                                   ignore_patterns=[MARKER_NAME])
    # The hub client fails from several layers (its HTTP errors, the HTTP library's, offline mode's
    # ConnectionError, a missing token's), and the user's fix is the same for each: one line naming them.
    except Exception as exc:
        raise PrefoptError(_push_failed(repo_id, exc)) from exc
    return str(getattr(commit, "commit_url", commit))


def _push_failed(repo_id: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    offline = "; HF_HUB_OFFLINE is set, which blocks every hub call" if os.environ.get("HF_HUB_OFFLINE", "") not in (
        "", "0", "false", "False") else ""
    return (f"pushing to hub repository {repo_id!r} failed ({type(exc).__name__}: {first}){offline}; check the "
            f"token (HF_TOKEN, `hf auth login`, or output.push_to_hub.token_env) can write to {repo_id}, the network "
            f"(HF_ENDPOINT, HF_HUB_OFFLINE), and that the repository id is yours")
