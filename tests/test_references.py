"""Reference providers: the content-addressed cache (its key, find-or-build-then-open), a reference that
follows the policy (TR-DPO syncs, under LoRA too), several references at once from the cache (MRPO), their
errors, and exact resume after SIGKILL."""

from __future__ import annotations

import pytest
import torch

from helpers import kill_after, tiny_recipe, train_losses, validated
from prefopt import engine
from prefopt.data.types import TokenizedPair, TokenizedPairs
from prefopt.errors import PrefoptError
from prefopt.forward.batching import collate_pairs
from prefopt.reference.cache import cache_key, cache_path, cached_reference
from prefopt.reference.following import FollowingReference, FollowingWeights
from prefopt.reference.providers import LiveReference


def test_cache_key_is_unchanged_so_existing_caches_are_reused():
    """The key of a fixed input, as computed before the cache code moved: a change would orphan every cache."""
    pairs = TokenizedPairs(source="s", pairs=[], fingerprint="f" * 64)
    assert cache_key("a" * 64, pairs, "bfloat16/no") == (
        "ad4bf2c7b216f4b7ecc34dd4ecbd3b6c5d262e39d0a814aef6f4601c7663032b"
    )


def test_cached_reference_builds_once_then_opens_what_it_built(tiny_model):
    pairs = TokenizedPairs(
        source="test", fingerprint="cached-reference-test",
        pairs=[TokenizedPair(i, (1, 5 + i), (7, 8, 2), (9, 2)) for i in range(3)],
    )
    live, said = LiveReference(tiny_model), []
    options = dict(weights="w", dtype="float32/no", batch_size=2, pad_id=2, show_progress=False, say=said.append)
    first, hit = cached_reference(live, pairs, **options, label="reference x")
    assert not hit and first.path == cache_path(cache_key("w", pairs, "float32/no"))
    assert said == [f"reference x: computing log-probs of 3 pairs once into {first.path}"]
    passes = live.forward_passes
    second, hit = cached_reference(live, pairs, **options)
    assert hit and second.path == first.path and live.forward_passes == passes and len(said) == 1
    batch = collate_pairs(pairs.pairs, [0, 1, 2], 2)
    torch.testing.assert_close(second(batch).sums, live(batch).sums, rtol=1e-5, atol=1e-5)


def _policy_params(run) -> dict[str, torch.Tensor]:
    module = run.accelerator.unwrap_model(run.policy)
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _following(run) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in run.reference.following.weights.tensors.items()}


def _sync_run(tiny_model_dir, pairs_file, out, sync, **sections):
    tree = tiny_recipe(tiny_model_dir, pairs_file, out, reference={"sync": sync}, **sections)
    return engine.setup(validated(tree), show_progress=False)


def test_hard_sync_makes_the_reference_equal_the_policy_right_after_each_sync(tiny_model_dir, pairs_file, tmp_path):
    run = _sync_run(tiny_model_dir, pairs_file, tmp_path / "run", {"mode": "hard", "every": 2})
    initial = _policy_params(run)
    engine.train_step(run, 0)  # step 1: no sync yet, the reference is still the initial policy
    after_one = _policy_params(run)
    assert any(not torch.equal(after_one[n], initial[n]) for n in initial)
    assert all(torch.equal(t, initial[n]) for n, t in _following(run).items())
    engine.train_step(run, 1)  # step 2: sync
    policy = _policy_params(run)
    assert all(torch.equal(t, policy[n]) for n, t in _following(run).items())  # bitwise
    engine.train_step(run, 2)  # step 3: the policy moves on, the reference stays at step 2's weights
    assert all(torch.equal(t, policy[n]) for n, t in _following(run).items())
    assert any(not torch.equal(t, _policy_params(run)[n]) for n, t in _following(run).items())


def test_soft_sync_mixes_alpha_of_the_policy_into_the_reference_parameter_by_parameter(
    tiny_model_dir, pairs_file, tmp_path
):
    run = _sync_run(tiny_model_dir, pairs_file, tmp_path / "run", {"mode": "soft", "alpha": 0.6, "every": 1})
    engine.train_step(run, 0)
    before = _following(run)
    engine.train_step(run, 1)
    policy, after = _policy_params(run), _following(run)
    for name in after:
        expected = (0.6 * policy[name].double() + 0.4 * before[name].double()).float()
        # float32 arithmetic: within 2 units in the last place of the exact mix
        torch.testing.assert_close(after[name], expected, rtol=2.4e-7, atol=1e-9, msg=name)
        assert not torch.equal(after[name], policy[name])


def test_lora_sync_follows_the_adapter_only_and_scores_like_the_policy(tiny_model_dir, pairs_file, tmp_path):
    from prefopt.forward.batching import collate_pairs
    from prefopt.forward.logprobs import sequence_logps

    run = _sync_run(tiny_model_dir, pairs_file, tmp_path / "run", {"mode": "hard", "every": 1},
                    model={"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}},
                    train={"learning_rate": 1e-2, "max_steps": 3})
    followed = _following(run)
    assert followed and all("lora_" in name for name in followed)  # the base weights are shared, not copied
    batch = collate_pairs(run.train_pairs.pairs[:4], range(4), run.tokenizer.pad_token_id)
    at_start = run.reference(batch)[0].sums
    engine.train_step(run, 0)  # trains the adapter, then syncs it into the reference
    model = run.accelerator.unwrap_model(run.policy).eval()
    with torch.no_grad():
        policy_now = sequence_logps(model, batch).sums
    reference_now = run.reference(batch)[0].sums
    torch.testing.assert_close(reference_now, policy_now, rtol=0, atol=1e-6)
    assert (reference_now - at_start).abs().max() > 1e-4  # the reference did move


def test_following_reference_starts_as_the_live_reference(tiny_model_dir, pairs_file, tmp_path):
    """Before any sync the following reference gives the losses a frozen copy gives."""
    follow = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "f", reference={"sync": {"mode": "hard", "every": 50}})
    live = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "l", reference={"kind": "live"})
    engine.train(validated(follow), show_progress=False)
    engine.train(validated(live), show_progress=False)
    a, b = train_losses(tmp_path / "f"), train_losses(tmp_path / "l")
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6)


def test_following_weights_reject_bad_alpha_and_foreign_state():
    module = torch.nn.Linear(2, 2)
    weights = FollowingWeights(module)
    with pytest.raises(ValueError, match="alpha"):
        weights.sync(module, 0.0)
    with pytest.raises(RuntimeError, match="do not fit"):
        weights.load_state_dict({"other": torch.zeros(1)})
    with torch.no_grad():
        module.weight.add_(1.0)
    weights.ema_update(module, decay=0.9)
    assert torch.allclose(weights.tensors["weight"], module.weight - 0.9)
    assert isinstance(FollowingReference, type)


# ----------------------------------------------------------------------------------------------------------
# several references (MRPO)


@pytest.fixture()
def other_model_dir(tmp_path, tiny_model_dir):
    """The tiny model with every weight perturbed: a second, different reference of the same vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    path = tmp_path / "other-model"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_mrpo_with_every_reference_the_same_model_trains_like_dpo(tiny_model_dir, pairs_file, tmp_path):
    dpo = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "dpo")
    mrpo = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "mrpo", loss={"name": "mrpo", "beta": 0.1},
                       reference={"extra": [str(tiny_model_dir), str(tiny_model_dir)]})
    engine.train(validated(dpo), show_progress=False)
    summary = engine.train(validated(mrpo), show_progress=False)
    assert [e["source"] for e in summary["reference"]["extra"]] == [str(tiny_model_dir)] * 2
    a, b = train_losses(tmp_path / "dpo"), train_losses(tmp_path / "mrpo")
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6)


def test_mrpo_extra_references_come_from_the_cache_on_a_second_run(
    tiny_model_dir, other_model_dir, pairs_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    tree = lambda out: tiny_recipe(  # noqa: E731
        tiny_model_dir, pairs_dir, out, data={"eval_split": "test"}, loss={"name": "mrpo"},
        reference={"extra": [str(other_model_dir)]},
    )
    first = engine.train(validated(tree(tmp_path / "1")), show_progress=False)
    assert first["reference"]["extra"][0]["hit"] is False and first["reference"]["extra"][0]["forward_passes"] > 0
    second = engine.train(validated(tree(tmp_path / "2")), show_progress=False)
    assert second["reference"]["extra"][0] == {"source": str(other_model_dir), "hit": True, "forward_passes": 0}
    assert train_losses(tmp_path / "2") == train_losses(tmp_path / "1")
    dpo = tiny_recipe(tiny_model_dir, pairs_dir, tmp_path / "dpo", data={"eval_split": "test"})
    engine.train(validated(dpo), show_progress=False)
    # a different second reference changes the numbers
    assert train_losses(tmp_path / "1")[1] != pytest.approx(train_losses(tmp_path / "dpo")[1], abs=1e-6)
    assert "eval/loss/primary_weight" in second["eval_end"]


@pytest.mark.parametrize("sections,message", [
    ({"reference": {"extra": ["somewhere"]}}, "uses one reference"),
    ({"loss": {"name": "mrpo"}}, "list the models beyond the primary one in reference.extra"),
    ({"reference": {"kind": "cache", "sync": {"mode": "hard"}}}, "cannot be cached"),
    ({"reference": {"path": "x", "sync": {"mode": "hard"}}}, "remove reference.path"),
    ({"loss": {"name": "simpo"}, "reference": {"sync": {"mode": "hard"}}}, "uses no reference"),
])
def test_reference_recipe_errors_are_one_line_and_early(tiny_model_dir, pairs_file, tmp_path, sections, message):
    tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "run", **sections)
    with pytest.raises(PrefoptError, match=message) as caught:
        engine.setup(validated(tree), show_progress=False)
    assert "\n" not in str(caught.value)


def test_sync_options_are_validated(tiny_model_dir, pairs_file, tmp_path):
    from prefopt.errors import RecipeError

    for sync, message in [({"mode": "soft"}, "alpha is required"), ({"mode": "hard", "alpha": 0.5}, "for mode soft"),
                          ({"mode": "soft", "alpha": 1.5}, "less than or equal to 1")]:
        tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "run", reference={"sync": sync})
        with pytest.raises(RecipeError, match=message):
            validated(tree)


def test_extra_reference_with_another_vocabulary_is_refused(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other-tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<not-in-the-policy>"])
    tokenizer.save_pretrained(other)
    (other / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "run", loss={"name": "mrpo"},
                       reference={"extra": [str(other)]})
    with pytest.raises(PrefoptError, match="different tokenizer vocabulary"):
        engine.setup(validated(tree), show_progress=False)


# ----------------------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("variant", ["trdpo_soft", "trdpo_lora", "mrpo"])
def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(
    variant, tiny_model_dir, other_model_dir, pairs_file, tmp_path
):
    sections = {
        "trdpo_soft": {"reference": {"sync": {"mode": "soft", "alpha": 0.6, "every": 2}}},
        "trdpo_lora": {"reference": {"sync": {"mode": "hard", "every": 2}},
                       "model": {"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}}},
        "mrpo": {"loss": {"name": "mrpo"}, "reference": {"extra": [str(other_model_dir)]}},
    }[variant]
    train = {"max_steps": None, "epochs": 3, "save_every": 3, "lr_scheduler": "cosine", "learning_rate": 3e-3}
    full = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "full", train=train, **sections)
    engine.train(validated(full), show_progress=False)
    killed = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "killed", train=train, **sections)
    kill_after(killed, tmp_path / "killed.yaml", tmp_path / "killed" / "checkpoints" / "step-0000003")
    engine.train(validated(killed), show_progress=False)
    expected, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "killed")
    assert list(resumed) == list(range(1, 10))
    for step, value in expected.items():
        assert resumed[step] == pytest.approx(value, rel=0, abs=1e-6), step
