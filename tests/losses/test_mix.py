"""Mix (``prefopt_plugins.losses.mix``): the weighted sum by hand, declared needs, metrics, state and train mode
delegated to components, errors that name their path, parity with TRL 1.16's weighted multi-loss, and the MPO
recipe through the real engine.

Notation as in VARIANTS.md §0. Per pair, with components k:  L = sum_k weight_k * L_k.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from helpers import tiny_recipe, validated
from prefopt import PreferenceLoss, engine
from prefopt.forward.batching import collate_pairs
from prefopt.errors import PrefoptError
from prefopt.registry.loading import EXTRA_PLUGINS_ENV, Registry, default_plugins, load_plugins
from prefopt.recipe import load_recipe
from prefopt_plugins.losses.bco_pair import BCOPair
from prefopt_plugins.losses.dpo import DPO
from prefopt_plugins.losses.mix import Mix
from prefopt_plugins.losses.rpo import RPO
from trl_harness import (
    assert_matches_trl, pair_logps_of, prefopt_pair_logps, random_preference_batch, trl_compute_loss, trl_dpo_trainer,
)

F64 = torch.float64
# The modules this file's losses come from, registered explicitly so the tests do not depend on entry points.
MODULES = ["prefopt_plugins.losses.nll", "prefopt_plugins.losses.wpo", "prefopt_plugins.losses.mix"]
MPO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "mpo" / "quickstart.yaml"


@pytest.fixture(scope="module")
def losses():
    return load_plugins(extra=MODULES).losses


def mix(losses, *components: dict) -> Mix:
    return Mix(Mix.Config(components=list(components)), losses=losses)


def one_pair(requires_grad: bool = False):
    """pc = -1, pr = -3, rc = rr = -2, one chosen token: Dc = 1, Dr = -1, m = 2."""
    return pair_logps_of([-1.0], [-3.0], [-2.0], [-2.0], chosen_tokens=[1.0], requires_grad=requires_grad)


# ----------------------------------------------------------------------------------------------------------
# The sum, by hand


def test_mpo_by_hand(losses):
    """MPO's weights on one pair, beta = 0.1 for DPO and BCO (no shift):
    DPO  l(0.1 * 2) = log(1 + e^-0.2) = 0.5981388693815918
    BCO  l(0.1 * 1) + l(-0.1 * -1) = 2 log(1 + e^-0.1) = 1.2887933201471418
    NLL  -pc * B / Lc = 1
    L = 0.8 * 0.5981388693815918 + 0.2 * 1.2887933201471418 + 1.0 * 1 = 1.7362697595347019.
    Metrics: each component's unweighted loss under its name, and BCO's own delta as bco_pair/delta.
    Rewards are the first component's, DPO's beta * (p - r) = 0.1, -0.1. Tolerance 1e-12."""
    loss = mix(losses, {"name": "dpo", "beta": 0.1, "weight": 0.8},
               {"name": "bco_pair", "beta": 0.1, "running_shift": False, "weight": 0.2}, {"name": "nll"})
    out = loss(one_pair())
    assert out.loss.item() == pytest.approx(1.7362697595347019, abs=1e-12)
    assert sorted(out.metrics) == ["bco_pair", "bco_pair/delta", "dpo", "nll"]
    assert out.metrics["dpo"].item() == pytest.approx(0.5981388693815918, abs=1e-12)
    assert out.metrics["bco_pair"].item() == pytest.approx(1.2887933201471418, abs=1e-12)
    assert out.metrics["nll"].item() == pytest.approx(1.0, abs=1e-12)
    assert out.metrics["bco_pair/delta"].item() == 0.0
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.1, abs=1e-12)
    assert not any(m.requires_grad for m in out.metrics.values())


def test_gradient_is_the_weighted_sum(losses):
    """d L / d pc = 0.8 * dDPO + 0.2 * dBCO + 1 * dNLL with, at m = 2, beta = 0.1:
    dDPO/dpc = -0.1 * sigmoid(-0.2), dBCO/dpc = -0.1 * sigmoid(-0.1), dNLL/dpc = -1 (one token, B = 1)."""
    logps = one_pair(requires_grad=True)
    mix(losses, {"name": "dpo", "weight": 0.8}, {"name": "bco_pair", "beta": 0.1, "running_shift": False,
                                                 "weight": 0.2}, {"name": "nll"})(logps).loss.sum().backward()
    sig = lambda z: 1 / (1 + torch.exp(torch.tensor(-z, dtype=F64)))  # noqa: E731
    expected = 0.8 * -0.1 * sig(-0.2) + 0.2 * -0.1 * sig(-0.1) - 1.0
    assert logps.policy_chosen.grad.item() == pytest.approx(expected.item(), abs=1e-12)


@pytest.mark.parametrize("component", [{"name": "dpo", "beta": 0.3}, {"name": "rpo", "beta": 0.2, "alpha": 0.5},
                                       {"name": "nll"}, {"name": "ipo", "beta": 0.5}])
def test_one_component_of_weight_one_is_that_component(component, losses):
    """A mix of one component, weight 1: loss, rewards and gradients equal the component's own, to 1e-12, and
    its metrics reappear under its name."""
    batch = random_preference_batch(8, length=12, seed=23)
    per_token_logps = batch.pop("per_token_logps")
    cls = losses.get(component["name"])
    alone = cls(cls.Config(**{k: v for k, v in component.items() if k != "name"}))
    logps, leaf = prefopt_pair_logps(batch, per_token_logps)
    ours = mix(losses, {**component, "weight": 1.0})(logps)
    theirs = alone(logps)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.chosen_rewards, theirs.chosen_rewards, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.rejected_rewards, theirs.rejected_rewards, rtol=0, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours.loss.sum(), leaf)
    (g_theirs,) = torch.autograd.grad(theirs.loss.sum(), leaf)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-12)
    assert set(ours.metrics) == {component["name"], *(f"{component['name']}/{k}" for k in theirs.metrics)}


def test_declared_needs_are_the_union(losses):
    """The engine reads the instance's needs: a reference if any component needs one, per-token log-probs and
    log collision probabilities likewise."""
    free = mix(losses, {"name": "nll"}, {"name": "cpo"})
    assert not free.requires_reference and not free.requires_token_logps and not free.requires_token_log_collision
    both = mix(losses, {"name": "nll"}, {"name": "dpo"})
    assert both.requires_reference and not both.requires_token_logps
    assert mix(losses, {"name": "ld_dpo"}, {"name": "nll"}).requires_token_logps
    weighted = mix(losses, {"name": "wpo"}, {"name": "nll"})
    assert weighted.requires_reference and weighted.requires_token_log_collision


def test_paired_and_unpaired_losses_do_not_mix():
    """A loss declaring ``unpaired`` (rows are labelled examples, KTO) cannot share a mixture with a paired one;
    a mixture of unpaired losses is unpaired. Checked with a stand-in unpaired loss in a registry of its own."""

    class Unpaired(DPO):
        """A stand-in unpaired loss."""

        name, unpaired = "unpaired_stand_in", True

    registry = Registry("loss", PreferenceLoss)
    registry.add(DPO, "test", "test")
    registry.add(Unpaired, "test", "test")
    with pytest.raises(PrefoptError, match=r"paired and unpaired losses cannot be mixed: dpo \(paired\), "
                                           r"unpaired_stand_in \(unpaired\)"):
        mix(registry, {"name": "dpo"}, {"name": "unpaired_stand_in"})
    assert mix(registry, {"name": "unpaired_stand_in"}).unpaired
    assert not mix(registry, {"name": "dpo"}).unpaired


def test_rewards_are_the_first_components(losses):
    """nll first: its rewards, the summed log-probs pc = -1 and pr = -3, not DPO's."""
    out = mix(losses, {"name": "nll"}, {"name": "dpo"})(one_pair())
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (-1.0, -3.0)


def test_a_loss_listed_twice_is_told_apart_by_position(losses):
    """Two DPO terms with different betas log as dpo[0] and dpo[1]; their weighted sum is the loss."""
    out = mix(losses, {"name": "dpo", "beta": 0.1}, {"name": "nll"}, {"name": "dpo", "beta": 0.5, "weight": 2.0})(
        one_pair())
    assert sorted(out.metrics) == ["dpo[0]", "dpo[2]", "nll"]
    expected = out.metrics["dpo[0]"] + out.metrics["nll"] + 2.0 * out.metrics["dpo[2]"]
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# State and train mode reach the components


def bco_mix(losses) -> Mix:
    return mix(losses, {"name": "dpo"}, {"name": "bco_pair", "beta": 0.5, "running_shift": True})


def test_state_is_saved_and_restored_per_component(losses):
    """BCO's running delta lives in component 1; the mix saves it keyed '1:bco_pair' (stateless components save
    an empty dict), a fresh mix restored from it continues exactly where the first left off, and a checkpoint
    from another component list is refused."""
    trained = bco_mix(losses)
    for seed in (1, 2, 3):
        trained(pair_logps_of([-1.0 * seed], [-2.0], [-1.5], [-2.5], requires_grad=True))
    state = trained.state_dict()
    assert set(state) == {"0:dpo", "1:bco_pair"} and state["0:dpo"] == {}
    assert state["1:bco_pair"] == trained.components[1][2].state_dict() and state["1:bco_pair"]["batches"] == 3

    restored = bco_mix(losses)
    restored.load_state_dict(state)
    probe = pair_logps_of([-0.5], [-2.0], [-1.5], [-2.5], requires_grad=True)
    torch.testing.assert_close(restored(probe).loss, trained(probe).loss, rtol=0, atol=1e-12)

    with pytest.raises(ValueError, match="was it saved with other components"):
        mix(losses, {"name": "bco_pair", "running_shift": True}, {"name": "dpo"}).load_state_dict(state)


def test_stateless_mix_saves_nothing(losses):
    stateless = mix(losses, {"name": "dpo"}, {"name": "nll"})
    assert stateless.state_dict() == {}
    stateless.load_state_dict({})


def test_train_mode_reaches_the_components(losses):
    """In evaluation mode BCO's delta is read but not moved, as when the engine calls loss.train(False)."""
    loss = bco_mix(losses)
    bco: BCOPair = loss.components[1][2]
    loss(pair_logps_of([-1.0], [-2.0], [-1.5], [-2.5], requires_grad=True))
    assert loss.train(False) is loss and not bco.training
    before = bco.state_dict()
    loss(pair_logps_of([-5.0], [-2.0], [-1.5], [-2.5], requires_grad=True))
    assert bco.state_dict() == before
    loss.train(True)
    loss(pair_logps_of([-5.0], [-2.0], [-1.5], [-2.5], requires_grad=True))
    assert bco.state_dict()["batches"] == before["batches"] + 1


# ----------------------------------------------------------------------------------------------------------
# Errors name their path


@pytest.mark.parametrize("components, message", [
    ([{"name": "dpoo"}], r"loss\.components\[0\]\.name: unknown loss 'dpoo' \(did you mean 'dpo'"),
    ([{"name": "dpo"}, {"name": "dpo", "beta": -1}],
     r"^loss\.components\[1\]\.beta: Input should be greater than 0 \(got -1\)$"),
    ([{"name": "dpo", "bta": 0.1}], r"loss\.components\[0\]\.bta: unknown option of loss 'dpo' \(did you mean 'beta'"),
    ([{"name": "nll", "weight": 0}], r"loss\.components\[0\]\.weight: Input should be greater than 0"),
    ([{"weight": 0.5}], r"loss\.components\[0\]\.name: required but missing"),
    ([{"name": "mix", "components": [{"name": "dpo"}]}], r"loss\.components\[0\]\.name: a mix cannot contain a mix"),
])
def test_a_bad_component_names_its_path(components, message, losses):
    with pytest.raises(PrefoptError, match=message):
        mix(losses, *components)


def test_every_problem_is_reported_at_once(losses):
    with pytest.raises(PrefoptError) as caught:
        mix(losses, {"name": "dpo", "beta": 0}, {"name": "nlll"}, {"name": "nll", "weight": -1})
    lines = str(caught.value).splitlines()
    assert lines[0] == "loss.components: 3 problems"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "loss.components[0].beta", "loss.components[1].name", "loss.components[2].weight"]


def test_config_needs_at_least_one_component():
    with pytest.raises(ValidationError, match="at least 1 item"):
        Mix.Config(components=[])
    with pytest.raises(ValidationError, match="Field required"):
        Mix.Config()


# ----------------------------------------------------------------------------------------------------------
# Parity with TRL 1.16's weighted multi-loss


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tokenizer, tmp_path_factory):
    return trl_dpo_trainer(tiny_model_dir, tokenizer, 0.1, tmp_path_factory.mktemp("trl"),
                           loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])


# TRL loss type -> the prefopt component that equals it (BCO without the shift TRL >= 0.29 dropped).
COMPONENT = {"sigmoid": {"name": "dpo"}, "bco_pair": {"name": "bco_pair", "running_shift": False},
             "sft": {"name": "nll"}}


@pytest.mark.parametrize("loss_types, weights, beta", [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.1),  # MPO
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.5),
    (["sigmoid", "sft"], [1.0, 0.5], 0.1),  # RPO
    (["bco_pair", "sigmoid"], [2.0, 0.3], 0.2),
])
def test_matches_trl_weighted_multi_loss(loss_types, weights, beta, trainer, losses):
    """Equals TRL 1.16 ``loss_type=loss_types, loss_weights=weights`` on one micro-batch: loss, gradient (on
    response positions, where TRL's sft term reads) and logged rewards to 1e-6 in float64. Each component's
    logged loss equals TRL run with that loss type alone. TRL shares one beta; here each component has its own,
    set to TRL's (nll has none)."""
    batch = random_preference_batch(8, length=12, seed=int(beta * 100) + len(loss_types))
    per_token_logps = batch.pop("per_token_logps")
    trl = trl_compute_loss(trainer, batch, per_token_logps, beta=beta, loss_types=loss_types, loss_weights=weights)
    components = [{**COMPONENT[t], "weight": w, **({} if t == "sft" else {"beta": beta})}
                  for t, w in zip(loss_types, weights)]
    logps, leaf = prefopt_pair_logps(batch, per_token_logps)
    out = mix(losses, *components)(logps)
    assert_matches_trl(out, leaf, trl, grad_positions=batch["completion_mask"][:, 1:].bool())
    for loss_type, component in zip(loss_types, components):
        alone = trl_compute_loss(trainer, batch, per_token_logps, beta=beta, loss_types=[loss_type])
        assert out.metrics[component["name"]].mean().item() == pytest.approx(alone.loss.item(), abs=1e-6)


def test_dpo_plus_nll_is_rpo(losses):
    """RPO is the mixture DPO + alpha * NLL, to 1e-12."""
    batch = random_preference_batch(8, length=12, seed=29)
    logps, _ = prefopt_pair_logps(batch, batch.pop("per_token_logps"))
    ours = mix(losses, {"name": "dpo", "beta": 0.2}, {"name": "nll", "weight": 0.3})(logps)
    torch.testing.assert_close(ours.loss, RPO(RPO.Config(beta=0.2, alpha=0.3))(logps).loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.metrics["dpo"], DPO(DPO.Config(beta=0.2))(logps).loss, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# The MPO recipe


@pytest.fixture()
def registered(monkeypatch):
    """The process's plugins with this file's modules added, as a recipe run would load them (PREFOPT_PLUGINS),
    whether or not their entry points are installed; the plugin cache is rebuilt before and after."""
    monkeypatch.setenv(EXTRA_PLUGINS_ENV, ",".join(MODULES))
    default_plugins.cache_clear()
    yield default_plugins()
    monkeypatch.undo()
    default_plugins.cache_clear()


def mpo_loss_section() -> dict:
    return yaml.safe_load(MPO_RECIPE.read_text())["loss"]


def test_shipped_mpo_recipe_builds_its_components(registered):
    """recipes/mpo/quickstart.yaml validates, and its loss builds as the engine builds it (recipe validation does
    not check components' options; building does): DPO 0.8, BCO 0.2 with the shift, NLL 1.0."""
    recipe = load_recipe(MPO_RECIPE)
    cls = registered.losses.get(recipe.loss.name)
    loss = cls(cls.Config.model_validate(recipe.loss.model_dump(exclude={"name"})))
    assert [(key, weight) for key, weight, _ in loss.components] == [("dpo", 0.8), ("bco_pair", 0.2), ("nll", 1.0)]
    assert loss.components[1][2].config.running_shift and loss.requires_reference


WPO_NLL = {"name": "mix", "components": [{"name": "wpo", "beta": 0.1}, {"name": "nll", "weight": 0.5}]}


@pytest.mark.parametrize("section, logged", [
    (None, {"loss/dpo", "loss/bco_pair", "loss/nll", "loss/bco_pair/delta"}),  # the shipped MPO recipe's
    (WPO_NLL, {"loss/wpo", "loss/wpo/weight", "loss/nll"}),  # a component that needs log collision probabilities
], ids=["mpo_recipe", "wpo_nll"])
def test_engine_trains_a_mixture_a_step(section, logged, registered, tiny_model_dir, pairs_file, tmp_path):
    """A mixture on the tiny model: the recipe tree validates, the engine builds the mixture and computes what
    its components need (WPO's per-token statistics through a mix), one optimizer step raises the margin of
    log-ratios on the step's batch, and each component's loss and metrics are logged under loss/."""
    tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "mix",
                       train={"batch_size": 4, "micro_batch_size": 4, "learning_rate": 1e-3, "max_steps": 1})
    tree["loss"] = section or mpo_loss_section()  # whole: tiny_recipe would merge it into its dpo section
    run = engine.setup(validated(tree), show_progress=False)
    assert isinstance(run.loss, Mix) and run.reference is not None
    indices = engine.step_pairs(run, 0)
    before = mean_margin(run, indices)
    values = engine.train_step(run, 0)
    assert mean_margin(run, indices) > before + 1e-3
    assert logged <= set(values)
    assert torch.isfinite(torch.tensor(values["loss"]))


def mean_margin(run, indices) -> float:
    """Mean of (pc - rc) - (pr - rr) over the pairs at ``indices``, without gradients."""
    batch = collate_pairs([run.train_pairs.pairs[i] for i in indices], indices, run.tokenizer.pad_token_id)
    with torch.no_grad():
        logps, _ = engine.forward_pairs(run, batch, run.reference)
    return float(((logps.policy_chosen - logps.ref_chosen) - (logps.policy_rejected - logps.ref_rejected)).mean())
