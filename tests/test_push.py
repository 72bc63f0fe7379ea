"""Pushing a model to the hub: ``prefopt push RUN_DIR REPO_ID`` and ``output.push_to_hub`` at a run's end.

No hub is reachable here. The real huggingface_hub client is run up to its network call (offline mode, and an
endpoint nothing listens on), and its failure must be one line naming the repository and what to check; a
fake ``HfApi`` records what a push would send.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import one_line_error, validated
from prefopt import engine
from prefopt.errors import PrefoptError
from prefopt.publish.card import CARD_NAME
from prefopt.publish.commands import add_parser, run
from prefopt.testing import tiny_recipe

TESTS = Path(__file__).resolve().parent


def push_main(argv: list[str]) -> int:
    """``prefopt push ARGV``: through ``prefopt.cli.main`` once the command is wired there, else through the same
    parser and error line (``prefopt: error: ...``, exit status 2) the CLI gives every command."""
    from prefopt import cli

    if "push" in getattr(cli, "COMMANDS", {}):
        return cli.main(["push", *argv])
    parser = argparse.ArgumentParser(prog="prefopt")
    add_parser(parser.add_subparsers(dest="command", required=True))
    try:
        return run(parser.parse_args(["push", *argv]))
    except PrefoptError as exc:
        sys.stderr.write(f"prefopt: error: {exc}\n")
        return exc.exit_status


def push_error(capsys, argv: list[str]) -> str:
    """``push_main(argv)`` must fail with exactly one line on stderr, exit status 2; that line."""
    capsys.readouterr()
    assert push_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("prefopt: error: ")
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run with its saved model (trained once for this module; tests push copies of it)."""
    workdir = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFOPT_CACHE", str(workdir / "cache"))  # never the user's cache
        tree = tiny_recipe(workdir, steps=2, output={"save_model": True})
        engine.run(validated(tree), show_progress=False)
    return workdir / "run"


@pytest.fixture()
def run_dir(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records each call, with the folder's files at upload time."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None, **_):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_repo", {"repo_id": repo_id, "token": self.token, **kwargs}))

    def create_branch(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, folder_path, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        card = (Path(folder_path) / CARD_NAME).read_text() if (Path(folder_path) / CARD_NAME).exists() else None
        FakeHub.calls.append(("upload_folder", {"folder_path": folder_path, "files": files, "card": card, **kwargs}))
        return f"https://hub.example/{kwargs['repo_id']}/commit/1"


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub.calls


# ----------------------------------------------------------------------------------------------------------
# prefopt push


def test_push_sends_the_model_folder_with_its_card(run_dir, fake_hub, capsys, monkeypatch):
    monkeypatch.setenv("MY_WRITE_TOKEN", "hf_secret")
    assert push_main([str(run_dir), "me/tiny-dpo", "--private", "--revision", "v1", "--token-env",
                      "MY_WRITE_TOKEN"]) == 0
    (create, repo), (branch, ref), (upload, sent) = fake_hub
    assert (create, repo) == ("create_repo", {"repo_id": "me/tiny-dpo", "token": "hf_secret", "repo_type": "model",
                                              "private": True, "exist_ok": True})
    assert (branch, ref) == ("create_branch", {"repo_id": "me/tiny-dpo", "repo_type": "model", "branch": "v1",
                                               "exist_ok": True})
    assert upload == "upload_folder" and sent["repo_id"] == "me/tiny-dpo" and sent["revision"] == "v1"
    assert sent["folder_path"] == str(run_dir / "model") and sent["ignore_patterns"] == [".prefopt"]
    assert {CARD_NAME, "config.json", "model.safetensors", "tokenizer.json"} <= set(sent["files"])
    assert 'model_id = "me/tiny-dpo"' in sent["card"]  # the card's snippet loads from the repository now
    assert capsys.readouterr().out.strip() == (f"pushed {run_dir / 'model'} to me/tiny-dpo: "
                                               "https://hub.example/me/tiny-dpo/commit/1")


def test_push_defaults_to_public_main(run_dir, fake_hub):
    assert push_main([str(run_dir), "me/tiny-dpo"]) == 0
    assert [name for name, _ in fake_hub] == ["create_repo", "upload_folder"]  # no branch to create
    assert fake_hub[0][1]["private"] is False and fake_hub[0][1]["token"] is None and fake_hub[1][1]["revision"] is None


def test_push_writes_the_card_a_model_saved_without_one_lacks(run_dir, fake_hub):
    (run_dir / "model" / CARD_NAME).unlink()
    assert push_main([str(run_dir), "me/old-run"]) == 0
    card = (run_dir / "model" / CARD_NAME).read_text()
    assert yaml.safe_load(card.split("---\n")[1])["library_name"] == "transformers"
    assert "# old-run" in card and 'model_id = "me/old-run"' in card and card == fake_hub[-1][1]["card"]


@pytest.mark.parametrize("damage, message", [
    ("no run", "no such directory; give a run's output.dir"),
    ("no model", "holds no model/: the run has not finished, or ran with output.save_model: false"),
    ("not prefopt's", "was not written by prefopt (no .prefopt marker of a model)"),
    ("no weights", "is incomplete (no config.json or adapter_config.json, or no .safetensors weights)"),
])
def test_push_refuses_anything_but_a_complete_model_prefopt_wrote(run_dir, fake_hub, capsys, damage, message):
    target = run_dir
    if damage == "no run":
        target = run_dir / "elsewhere"
    elif damage == "no model":
        shutil.rmtree(run_dir / "model")
    elif damage == "not prefopt's":
        (run_dir / "model" / ".prefopt").unlink()
    else:
        (run_dir / "model" / "model.safetensors").unlink()
    assert message in push_error(capsys, [str(target), "me/tiny-dpo"])
    assert fake_hub == []  # nothing was sent


def test_push_refuses_a_bad_repo_id_or_a_missing_token_variable(run_dir, fake_hub, capsys, monkeypatch):
    assert "REPO_ID: 'me/tiny/dpo' is not a hub repository id" in push_error(capsys, [str(run_dir), "me/tiny/dpo"])
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    err = push_error(capsys, [str(run_dir), "me/tiny-dpo", "--token-env", "NO_SUCH_TOKEN"])
    assert "--token-env is 'NO_SUCH_TOKEN', but the environment variable NO_SUCH_TOKEN is not set" in err
    assert fake_hub == []


def push_in_a_child(run_dir: Path, env: dict) -> subprocess.CompletedProcess:
    """``prefopt push RUN_DIR me/tiny-dpo`` in a fresh process: huggingface_hub reads HF_ENDPOINT and
    HF_HUB_OFFLINE when it is imported, so only a new process sees them changed."""
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); from test_push import push_main; " \
           "sys.exit(push_main(sys.argv[1:]))"
    env = {**os.environ, "HF_TOKEN": "hf_not_a_real_token", "TOKENIZERS_PARALLELISM": "false", **env}
    return subprocess.run([sys.executable, "-c", code, str(run_dir), "me/tiny-dpo"], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("env, cause", [
    ({"HF_HUB_OFFLINE": "1"}, "(OfflineModeIsEnabled: Cannot reach https://huggingface.co/api/repos/create: offline "
                              "mode is enabled."),
    ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "(ConnectError: [Errno 111] Connection refused)"),
])
def test_a_hub_that_cannot_be_reached_is_one_line_naming_the_repo(run_dir, env, cause):
    child = push_in_a_child(run_dir, env)
    assert child.returncode == 2, child.stderr
    err = child.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("prefopt: error: pushing to hub repository 'me/tiny-dpo' failed ") and cause in err
    assert ("HF_HUB_OFFLINE is set, which blocks every hub call" in err) == (env["HF_HUB_OFFLINE"] == "1")
    assert err.endswith("check the token (HF_TOKEN, `hf auth login`, or output.push_to_hub.token_env) can write to "
                        "me/tiny-dpo, the network (HF_ENDPOINT, HF_HUB_OFFLINE), and that the repository id is yours")


# ----------------------------------------------------------------------------------------------------------
# output.push_to_hub at the end of a run


def test_a_run_pushes_its_model_at_the_end(tmp_path, fake_hub, capsys):
    tree = tiny_recipe(tmp_path, steps=1, output={"save_model": True,
                                                  "push_to_hub": {"repo_id": "me/tiny-dpo", "private": True}})
    engine.run(validated(tree), show_progress=False)
    assert [name for name, _ in fake_hub] == ["create_repo", "upload_folder"]
    assert fake_hub[0][1]["private"] is True
    assert fake_hub[1][1]["folder_path"] == str(tmp_path / "run" / "model") and CARD_NAME in fake_hub[1][1]["files"]
    assert 'model_id = "me/tiny-dpo"' in fake_hub[1][1]["card"]  # written for the repository from the start
    assert "# tiny-dpo" in fake_hub[1][1]["card"]
    assert "pushed the model to me/tiny-dpo: https://hub.example/me/tiny-dpo/commit/1" in capsys.readouterr().out


def test_a_push_that_fails_ends_a_complete_run_with_one_line(tmp_path, capsys):
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # tests/conftest.py sets HF_HUB_OFFLINE=1
    run_dir = tmp_path / "run"
    tree = tiny_recipe(tmp_path, steps=1, output={"save_model": True, "push_to_hub": {"repo_id": "me/tiny-dpo"}})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    capsys.readouterr()
    err = one_line_error(capsys, ["train", str(path), "--no-progress"])
    assert "pushing to hub repository 'me/tiny-dpo' failed (OfflineModeIsEnabled: " in err
    assert err.endswith(f"The run is complete in {run_dir}; push it with `prefopt push {run_dir} me/tiny-dpo`")
    assert (run_dir / "summary.json").is_file() and (run_dir / "model" / "model.safetensors").is_file()


def test_a_missing_token_variable_stops_the_run_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    push = {"repo_id": "me/tiny-dpo", "token_env": "NO_SUCH_TOKEN"}
    tree = tiny_recipe(tmp_path, steps=1, output={"save_model": True, "push_to_hub": push})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    capsys.readouterr()
    err = one_line_error(capsys, ["train", str(path), "--no-progress"])
    assert "output.push_to_hub.token_env is 'NO_SUCH_TOKEN', but the environment variable NO_SUCH_TOKEN is not " \
           "set" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_push_to_hub_needs_the_saved_model_and_a_valid_repo_id(tmp_path):
    from prefopt.errors import RecipeError

    tree = tiny_recipe(tmp_path, output={"save_model": False, "push_to_hub": {"repo_id": "me/x"}})
    with pytest.raises(RecipeError, match="output: push_to_hub uploads the saved model; set output.save_model: true"):
        validated(tree)
    tree["output"] = {"save_model": True, "push_to_hub": {"repo_id": "not a repo"}}
    with pytest.raises(RecipeError, match="output.push_to_hub.repo_id: 'not a repo' is not a hub repository id"):
        validated(tree)
