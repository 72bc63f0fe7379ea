"""``prefopt.testing``: what a plugin author tests with, built locally (no hub, no download)."""

from __future__ import annotations

import math
import os
import sys
import textwrap

import pytest
import torch

from prefopt.errors import RecipeError
from prefopt.paths import CACHE_ENV
from prefopt.registry.loading import load_plugins
from prefopt.testing import (
    PAIRS, pair_logps, preference_file, tiny_model, tiny_recipe, tiny_tokenizer, train_loss, write_recipe,
)

# A third-party loss as an author writes it, before it is installed: SLiC/RSO's hinge on the DPO margin.
HINGE_MODULE = '''
import torch
from pydantic import Field
from prefopt import LossConfig, LossOutput, PreferenceLoss, dpo_rewards, hookimpl

class HingeConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Scale of the log-ratio margin.")

class Hinge(PreferenceLoss):
    """Hinge loss on the policy-vs-reference margin."""
    name, Config, paper = "test_hinge", HingeConfig, "arXiv:2309.06657"

    def __call__(self, lp):
        margin = (lp.policy_chosen - lp.ref_chosen) - (lp.policy_rejected - lp.ref_rejected)
        chosen, rejected = dpo_rewards(self.config.beta, lp)
        return LossOutput(torch.relu(1 - self.config.beta * margin), chosen, rejected,
                          {"margin": margin.detach()})

@hookimpl
def prefopt_register_losses():
    return [Hinge]
'''


def dpo_only():
    """The built-in dpo loss alone: these tests need no other plugin."""
    return load_plugins(autoload=False, extra=["prefopt_plugins.losses.dpo"])


@pytest.fixture()
def hinge_plugins(tmp_path, monkeypatch):
    """The plugins of a test that names only the uninstalled hinge module (and no entry point)."""
    (tmp_path / "test_hinge_module.py").write_text(textwrap.dedent(HINGE_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield load_plugins(autoload=False, extra=["test_hinge_module"])
    sys.modules.pop("test_hinge_module", None)


def test_the_tokenizer_encodes_any_text_and_decodes_it_back():
    """Byte-level BPE: accents, symbols and digits never become unknown tokens; the merges are learnt from the
    sample pairs, so their words take few tokens; the same vocabulary every time."""
    tokenizer = tiny_tokenizer()
    for text in ("The movie was a joy.", "Ünïcode ✓, tabs\tand 123 digits", " leading space"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer(PAIRS[0][1])["input_ids"]) < len(PAIRS[0][1].encode())
    assert tiny_tokenizer().get_vocab() == tokenizer.get_vocab()
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_start|>",
                                                                              "<|im_end|>")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_the_tiny_model_is_a_model_path(tmp_path):
    """A folder prefopt loads as any model.path: the vocabulary fits the tokenizer, and a seed fixes the weights."""
    from prefopt.models.loading import load_causal_lm, load_tokenizer

    path = tiny_model(tmp_path / "model")
    model, tokenizer = load_causal_lm(str(path)), load_tokenizer(str(path))
    assert model.config.vocab_size == len(tokenizer) and model.config.num_hidden_layers == 2
    assert model.config.eos_token_id == tokenizer.eos_token_id
    again = load_causal_lm(str(tiny_model(tmp_path / "again")))
    for (name, weight), (_, same) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(weight, same), name


def test_the_recipe_validates_as_a_file(tmp_path):
    """``tiny_recipe`` is an ordinary recipe: saved with ``write_recipe`` it passes ``load_recipe``, and a bad
    option is the usual one-line problem."""
    from prefopt.recipe import load_recipe

    tree = tiny_recipe(tmp_path, loss="dpo", train={"learning_rate": 1e-4})
    path = write_recipe(tree, tmp_path / "recipe.yaml")
    recipe = load_recipe(path, plugins=dpo_only())
    assert recipe.loss.name == "dpo" and recipe.train.learning_rate == 1e-4 and recipe.train.max_steps == 2
    assert preference_file(tmp_path / "again.jsonl").read_text() == (tmp_path / "pairs.jsonl").read_text()
    with pytest.raises(RecipeError, match=r"loss\.bta: unknown option of loss 'dpo' \(did you mean 'beta'"):
        train_loss("dpo", tmp_path, {"bta": 0.1}, plugins=dpo_only())


def test_a_builtin_loss_trains_for_two_steps(tmp_path):
    """``train_loss`` by name: one metrics line per optimizer step, finite, and the policy moves (the chosen
    log-probs change between the steps)."""
    steps = train_loss("dpo", tmp_path, {"beta": 0.2})
    assert [entry["step"] for entry in steps] == [1, 2]
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"]) for entry in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at the first step
    assert steps[0]["logps/chosen"] != steps[1]["logps/chosen"]


def test_an_uninstalled_plugin_trains_with_its_metrics_and_a_private_cache(tmp_path, hinge_plugins, monkeypatch):
    """A plugin module named through ``plugins=``: its own metrics are logged under loss/<key>, and with no
    PREFOPT_CACHE set the reference cache goes under the work directory, the environment left as it was."""
    monkeypatch.delenv(CACHE_ENV, raising=False)
    steps = train_loss("test_hinge", tmp_path, {"beta": 0.5}, steps=2, plugins=hinge_plugins,
                       train={"micro_batch_size": 4})
    assert [entry["step"] for entry in steps] == [1, 2]
    assert steps[0]["loss"] == pytest.approx(1.0, abs=1e-4)  # relu(1 - 0): no margin before the first step
    assert all("loss/margin" in entry for entry in steps)
    assert any((tmp_path / "cache" / "reference").iterdir())
    assert CACHE_ENV not in os.environ


def test_pair_logps_gives_hand_worked_values():
    """DPO on one pair with margin (-1 - -1.5) - (-2 - -1.5) = 1 and beta 0.5: loss = -log sigmoid(0.5), and
    d loss / d policy_chosen = -0.5 * sigmoid(-0.5)."""
    from prefopt_plugins.losses.dpo import DPO

    logps = pair_logps([-1.0], [-2.0], [-1.5], [-1.5], requires_grad=True)
    out = DPO(DPO.Config(beta=0.5))(logps)
    expected = -math.log(1 / (1 + math.exp(-0.5)))
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    out.loss.sum().backward()
    assert logps.policy_chosen.grad.item() == pytest.approx(-0.5 / (1 + math.exp(0.5)), abs=1e-12)
    assert logps.chosen_tokens.tolist() == [1.0] and pair_logps([-1.0], [-2.0]).ref_chosen is None
