"""KTO (``prefopt_plugins.losses.kto``): hand-worked values, parity with TRL 1.16's KTOTrainer, and training.

Row i of the ``PairLogps`` a KTO loss sees is one unpaired example: ``pc, rc`` the policy and reference
log-probs of its own completion (summed over its tokens), ``pr, rr`` those of a mismatched completion after
the same prompt, and ``labels[i]`` True for a desirable completion. With r = pc - rc,

    z0 = max(0, mean_i (pr_i - rr_i))            (detached)
    desirable:   L = lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable: L = lambda_U * (1 - sigmoid(beta * (z0 - r)))
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers import tiny_recipe, validated
from prefopt import PairLogps, engine
from prefopt.forward.batching import collate_pairs
from prefopt.engine.metrics import PairMetrics
from prefopt.registry.loading import EXTRA_PLUGINS_ENV, default_plugins
from prefopt_plugins.losses.kto import KTO
from trl_harness import pair_logps_of, prefopt_pair_logps, random_preference_batch

F64 = torch.float64


def kto(beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> KTO:
    return KTO(KTO.Config(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight))


def unpaired_logps(pc, rc, pr, rr, labels, *, requires_grad: bool = False) -> PairLogps:
    """PairLogps of unpaired examples, in float64: own completion (pc, rc), mismatched one (pr, rr)."""
    logps = pair_logps_of(pc, pr, rc, rr, requires_grad=requires_grad)
    return replace(logps, labels=torch.tensor(labels))


# Two examples, worked through below: a desirable one with r = -1 - (-3) = 2 and an undesirable one with
# r = -4 - (-3) = -1; their mismatched completions have log-ratios -5 - (-6) = 1 and -2 - (-4) = 2.
TWO = dict(pc=[-1.0, -4.0], rc=[-3.0, -3.0], pr=[-5.0, -2.0], rr=[-6.0, -4.0], labels=[True, False])


# ----------------------------------------------------------------------------------------------------------
# Hand-worked values


def test_two_examples_by_hand():
    """beta = 0.1, lambda_D = lambda_U = 1, the examples of ``TWO``:

    z0 = max(0, (1 + 2) / 2) = 1.5
    desirable, r = 2:     1 - sigmoid(0.1 * (2 - 1.5))    = 1 - sigmoid(0.05) = 0.48750260351578967
    undesirable, r = -1:  1 - sigmoid(0.1 * (1.5 - (-1))) = 1 - sigmoid(0.25) = 0.43782349911420193
    chosen_rewards = beta * r = (0.2, -0.1); rejected_rewards = beta * (pr - rr) = (0.1, 0.2); kl = 1.5.
    Tolerance 1e-12 in float64.
    """
    out = kto()(unpaired_logps(**TWO))

    assert out.loss.shape == (2,) and out.loss.dtype == F64  # per example, in batch order
    torch.testing.assert_close(out.loss, torch.tensor([0.48750260351578967, 0.43782349911420193], dtype=F64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.2, -0.1], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([0.1, 0.2], dtype=F64), rtol=0, atol=1e-12)
    assert out.metrics["kl"].item() == pytest.approx(1.5, abs=1e-12)


def test_negative_kl_estimate_is_clamped_to_zero():
    """The same examples with mismatched log-ratios -1 and -3 (pr = -7, -7; rr = -6, -4): their mean -2 is
    clamped, z0 = 0, so
    desirable:   1 - sigmoid(0.1 * 2)  = 1 - sigmoid(0.2) = 0.45016600268752205
    undesirable: 1 - sigmoid(0.1 * 1)  = 1 - sigmoid(0.1) = 0.47502081252106
    """
    out = kto()(unpaired_logps(**{**TWO, "pr": [-7.0, -7.0]}))

    torch.testing.assert_close(out.loss, torch.tensor([0.45016600268752205, 0.47502081252106], dtype=F64),
                               rtol=0, atol=1e-12)
    assert out.metrics["kl"].item() == 0.0


def test_weights_scale_each_side():
    """lambda_D = 2, lambda_U = 0.5 scale the two losses of the first test:
    2 * 0.48750260351578967 = 0.9750052070315793,  0.5 * 0.43782349911420193 = 0.21891174955710097."""
    out = kto(desirable_weight=2.0, undesirable_weight=0.5)(unpaired_logps(**TWO))

    torch.testing.assert_close(out.loss, torch.tensor([0.9750052070315793, 0.21891174955710097], dtype=F64),
                               rtol=0, atol=1e-12)


def test_gradient_raises_desirable_lowers_undesirable_and_skips_the_kl_term():
    """With s(z) = sigmoid(z) and s' = s (1 - s):
    desirable:   dL/dpc = -beta * s'(0.05) = -0.1 * 0.24984381508111644 (< 0: a descent step raises pc)
    undesirable: dL/dpc = +beta * s'(0.25) = +0.1 * 0.24613408273759835 (> 0: it lowers pc)
    dL/drc is the opposite of dL/dpc. z0 is detached, so the mismatched log-probs pr, rr get no gradient.
    """
    logps = unpaired_logps(**TWO, requires_grad=True)
    kto()(logps).loss.sum().backward()

    expected = torch.tensor([-0.1 * 0.24984381508111644, 0.1 * 0.24613408273759835], dtype=F64)
    torch.testing.assert_close(logps.policy_chosen.grad, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(logps.ref_chosen.grad, -expected, rtol=0, atol=1e-12)
    assert logps.policy_rejected.grad is None or not logps.policy_rejected.grad.any()
    assert logps.ref_rejected.grad is None or not logps.ref_rejected.grad.any()


def test_paired_logps_are_refused():
    """KTO needs labels; a PairLogps of pairs (labels None) is a wiring error, said plainly."""
    with pytest.raises(ValueError, match="labels"):
        kto()(pair_logps_of([-1.0], [-2.0], [-1.0], [-2.0]))


def test_metrics_follow_trl_kto_logging():
    """PairMetrics on the two examples: rewards/chosen averages beta * r over desirable examples (0.2),
    rewards/rejected over undesirable ones (-0.1), margins is their difference (0.3), logps/* likewise
    average pc (-1 and -4); no accuracy (no pair to rank); loss/kl = 1.5. One label alone logs no margin."""
    logps = unpaired_logps(**TWO)
    metrics = PairMetrics()
    metrics.add(logps, kto()(logps))
    values = metrics.reduced(None)

    assert "rewards/accuracies" not in values
    assert values["rewards/chosen"] == pytest.approx(0.2, abs=1e-6)
    assert values["rewards/rejected"] == pytest.approx(-0.1, abs=1e-6)
    assert values["rewards/margins"] == pytest.approx(0.3, abs=1e-6)
    assert values["logps/chosen"] == -1.0 and values["logps/rejected"] == -4.0
    assert values["loss/kl"] == pytest.approx(1.5)
    assert values["loss"] == pytest.approx((0.48750260351578967 + 0.43782349911420193) / 2, abs=1e-6)

    only_desirable = unpaired_logps(**{**TWO, "labels": [True, True]})
    metrics = PairMetrics()
    metrics.add(only_desirable, kto()(only_desirable))
    values = metrics.reduced(None)
    assert values["rewards/chosen"] == pytest.approx(0.05, abs=1e-6)  # (0.2 - 0.1) / 2
    assert not {"rewards/rejected", "logps/rejected", "rewards/margins"} & set(values)


def test_config_defaults_bounds_and_declarations():
    """beta 0.1 and lambda_D = lambda_U = 1 (the paper's and TRL's); non-positive values and unknown keys are
    rejected; KTO declares it trains on unpaired examples and needs the reference."""
    from pydantic import ValidationError

    config = KTO.Config()
    assert (config.beta, config.desirable_weight, config.undesirable_weight) == (0.1, 1.0, 1.0)
    for bad in ({"beta": 0}, {"desirable_weight": 0}, {"undesirable_weight": -1}):
        with pytest.raises(ValidationError, match="greater than 0"):
            KTO.Config(**bad)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        KTO.Config(loss_type="kto")
    assert KTO.unpaired is True and KTO.requires_reference is True


# ----------------------------------------------------------------------------------------------------------
# Parity with TRL 1.16 KTOTrainer._compute_loss


class UnpairedHeadStub(nn.Module):
    """Stands in for the policy TRL patches with its fused LM head, for KTO's two forwards.

    ``_compute_loss`` calls the model twice with ``fused_lm_head=True``: on ``KL_input_ids`` (the mismatched
    sequences, under no_grad) and on ``input_ids`` (the examples' own). Each call gets the per-token log-probs
    (B, T-1) drawn for the sequences it was given, plus the metric-only outputs TRL reads (``entropy``,
    ``mean_logits``), which do not touch the loss.
    """

    def __init__(self, sequences: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.sequences = sequences  # (input_ids, per-token log-probs) for each kind of sequence
        self.calls: list[dict] = []

    def forward(self, input_ids, **kwargs):
        self.calls.append({"input_ids": input_ids, **kwargs})
        [log_probs] = [logps for ids, logps in self.sequences if torch.equal(ids, input_ids)]
        zeros = torch.zeros_like(log_probs.detach())
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)


@pytest.fixture(scope="module")
def trl_kto_trainer(tiny_model_dir, tokenizer, tmp_path_factory):
    """A real trl.KTOTrainer (``loss_type="kto"``) on the tiny model, with reference log-probs precomputed, so
    that ``_compute_loss`` reads them from the batch (``ref_logps``, ``ref_KL_logps``) instead of running a
    reference model. Built once; each test sets beta and the weights where ``KTOTrainer.__init__`` copies them."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    rows = Dataset.from_dict({"prompt": ["The movie was"] * 4, "completion": [" good.", " bad.", " fine.", " dull."],
                              "label": [True, False, True, False]})
    args = KTOConfig(output_dir=str(tmp_path_factory.mktemp("trl-kto")), loss_type="kto",
                     precompute_ref_log_probs=True, report_to=[], bf16=False, use_cpu=True,
                     per_device_train_batch_size=2, disable_tqdm=True)
    trainer = KTOTrainer(model=str(tiny_model_dir), args=args, train_dataset=rows, processing_class=tokenizer)
    assert trainer.precompute_ref_logps and trainer.calculate_KL and trainer.loss_type == "kto"
    return trainer


def unpaired_batch(examples: int, kl_offset: float, seed: int):
    """A TRL KTO batch and the same numbers as prefopt's PairLogps, in float64.

    ``random_preference_batch`` draws 2B rows of per-token log-probs; rows 0..B-1 are the examples' own
    sequences, rows B..2B-1 their mismatched ones (the layout of prefopt's batches). Reference sums are drawn
    near the policy's: within +-20 nats for the own completions (rewards of both signs), and
    ``kl_offset`` +- 1 below them for the mismatched ones, so the KL estimate is about ``kl_offset`` (a
    negative offset exercises the clamp). Labels alternate, starting desirable, so both kinds are present.
    """
    drawn = random_preference_batch(examples, length=12, seed=seed)
    per_token = drawn["per_token_logps"].detach()
    sums = per_token.sum(1)
    gen = torch.Generator().manual_seed(seed + 1)
    noise = 2 * torch.rand(2 * examples, generator=gen, dtype=F64) - 1
    ref_own = sums[:examples] + 20 * noise[:examples]
    ref_kl = sums[examples:] - kl_offset + noise[examples:]
    labels = torch.arange(examples) % 2 == 0
    own, kl = slice(0, examples), slice(examples, None)
    trl_batch = {
        "input_ids": drawn["input_ids"][own], "attention_mask": drawn["attention_mask"][own],
        "completion_mask": drawn["completion_mask"][own],
        "KL_input_ids": drawn["input_ids"][kl], "KL_attention_mask": drawn["attention_mask"][kl],
        "KL_completion_mask": drawn["completion_mask"][kl],
        "label": labels, "ref_logps": ref_own, "ref_KL_logps": ref_kl,
    }
    ours, leaf = prefopt_pair_logps({**drawn, "ref_chosen_logps": ref_own, "ref_rejected_logps": ref_kl}, per_token)
    return trl_batch, per_token, replace(ours, labels=labels), leaf


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 1.0), (1.0, 0.5)],
                         ids=["equal", "desirable_up", "undesirable_down"])
@pytest.mark.parametrize("kl_offset", [3.0, -3.0], ids=["kl_positive", "kl_clamped"])
def test_matches_trl_kto_trainer_compute_loss(beta, weights, kl_offset, trl_kto_trainer):
    """prefopt's KTO equals TRL 1.16 ``KTOTrainer._compute_loss`` with ``loss_type="kto"``, to 1e-6 in float64.

    TRL's code, run as is: ``KTOTrainer.__init__`` (config, loss type, the KL term switched on, precomputed
    reference) and all of ``_compute_loss``: the KL forward (``_compute_kl_logps``, under no_grad) and its sums,
    the main forward's labels from the completion mask and per-sequence sums, the desirable/undesirable split
    by ``label``, the reference log-probs read from ``ref_logps``/``ref_KL_logps``, z0 = gathered mean of the
    KL log-ratios clamped at 0, both losses with their weights, ``nanmean``, the logged metrics and the
    backward graph.
    Stubbed: only the two policy forwards (``UnpairedHeadStub``), which return float64 per-token log-probs we
    drew; beta and the weights are set on the attributes ``__init__`` copies them to from ``KTOConfig``.
    Compared: TRL's loss vs. prefopt's per-example losses averaged; d(loss)/d(per-token log-probs) of the own
    sequences (and zero for the mismatched ones, which TRL runs without gradient); TRL's logged kl,
    rewards/chosen|rejected|margins and logps/chosen|rejected vs. what ``PairMetrics`` logs for prefopt.
    """
    trainer = trl_kto_trainer
    trainer.beta, (trainer.desirable_weight, trainer.undesirable_weight) = beta, weights
    examples = 6
    trl_batch, per_token, ours, leaf = unpaired_batch(examples, kl_offset, seed=int(beta * 1000) + int(weights[0] * 10))
    own_leaf = per_token[:examples].clone().requires_grad_(True)
    stub = UnpairedHeadStub([(trl_batch["input_ids"], own_leaf),
                             (trl_batch["KL_input_ids"], per_token[examples:].clone().requires_grad_(True))])

    trl_loss = trainer._compute_loss(stub, dict(trl_batch), return_outputs=False)
    assert [c["fused_lm_head"] for c in stub.calls] == [True, True]  # TRL ran both forwards
    (trl_grad,) = torch.autograd.grad(trl_loss, own_leaf)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train" if trainer.model.training else "eval"].items()}

    out = kto(beta, *weights)(ours)
    ours_loss = out.loss.mean()
    (our_grad,) = torch.autograd.grad(ours_loss, leaf)
    metrics = PairMetrics()
    metrics.add(ours, out)
    logged = metrics.reduced(None)

    assert trl_loss.dtype == F64 and ours_loss.dtype == F64
    assert ours_loss.item() == pytest.approx(trl_loss.item(), abs=1e-6, rel=0)
    torch.testing.assert_close(our_grad[:examples], trl_grad, rtol=0, atol=1e-6)
    assert not our_grad[examples:].any()
    assert out.metrics["kl"].item() == pytest.approx(trl_metrics["kl"], abs=1e-6, rel=0)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert logged[key] == pytest.approx(trl_metrics[key], abs=1e-6, rel=0), key
    for key in ("logps/chosen", "logps/rejected"):  # tens of nats, summed in float32 by PairMetrics
        assert logged[key] == pytest.approx(trl_metrics[key], rel=1e-6), key
    # The draw is informative: the clamp acts only where meant to, and rewards have both signs.
    assert (trl_metrics["kl"] > 0.5) == (kl_offset > 0)
    rewards = out.chosen_rewards
    assert (rewards > 0).any() and (rewards < 0).any()


# ----------------------------------------------------------------------------------------------------------
# Through the real engine


@pytest.fixture()
def registered(monkeypatch):
    """The process's plugins with kto added, as a recipe run loads it (PREFOPT_PLUGINS), whether or not its
    entry point is installed; the plugin cache is rebuilt before and after."""
    extra = [m for m in os.environ.get(EXTRA_PLUGINS_ENV, "").split(",") if m.strip()]
    monkeypatch.setenv(EXTRA_PLUGINS_ENV, ",".join([*extra, "prefopt_plugins.losses.kto"]))
    default_plugins.cache_clear()
    yield default_plugins()
    monkeypatch.undo()
    default_plugins.cache_clear()


def unpaired_file(path, rows):
    """Unpaired rows (prompt, completion, label) from the conftest pairs: chosen responses desirable,
    rejected ones undesirable, interleaved, with labels written as bools and as 0/1."""
    from conftest import PAIRS

    lines = []
    for i, (prompt, chosen, rejected) in enumerate(PAIRS[:rows]):
        lines.append({"prompt": prompt, "completion": chosen, "label": True if i % 2 else 1})
        lines.append({"prompt": prompt, "completion": rejected, "label": False if i % 2 else 0})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def logged_steps(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "loss" in m]


@pytest.mark.parametrize("data", ["unpaired", "paired"])
def test_engine_trains_kto(data, registered, tiny_model_dir, pairs_file, tmp_path, capsys):
    """The tiny model trains three steps of KTO on an unpaired jsonl file, or on the paired fixture (split into
    a desirable and an undesirable example per pair); every step logs KTO's metrics: rewards/chosen and
    rewards/rejected (averaged over desirable and undesirable examples), loss/kl, and no accuracy. The
    reference cache covers both sequences of every example, and a held-out split reports the same metrics."""
    path = unpaired_file(tmp_path / "unpaired.jsonl", rows=12) if data == "unpaired" else pairs_file
    tree = tiny_recipe(tiny_model_dir, path, tmp_path / "run", loss={"name": "kto"}, data={"eval_split": "train"},
                       train={"batch_size": 4, "micro_batch_size": 2, "max_steps": 3})
    summary = engine.train(validated(tree), show_progress=False)

    assert "24 unpaired examples (12 desirable, 12 undesirable)" in capsys.readouterr().out
    steps = logged_steps(tmp_path / "run")
    assert [m["step"] for m in steps] == [1, 2, 3]
    for values in steps:
        assert {"rewards/chosen", "rewards/rejected", "loss/kl"} <= set(values)
        assert "rewards/accuracies" not in values
        assert 0 < values["loss"] < 1 and values["loss/kl"] >= 0  # 1 - sigmoid is in (0, 1)
    assert summary["train_pairs"] == 24 and summary["reference"]["kind"] == "cache"
    assert summary["eval_end"]["eval/rewards/margins"] == pytest.approx(
        summary["eval_end"]["eval/rewards/chosen"] - summary["eval_end"]["eval/rewards/rejected"])


def test_kto_raises_the_desirable_minus_undesirable_reward(registered, tiny_model_dir, pairs_file, tmp_path):
    """One optimizer step on the paired fixture (split) raises the step batch's mean log-ratio of desirable
    completions minus that of undesirable ones, KTO's margin (the paired margin (pc - rc) - (pr - rr) is
    meaningless here: pr, rr belong to a mismatched completion)."""
    tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "run", loss={"name": "kto"},
                       train={"batch_size": 4, "micro_batch_size": 4, "learning_rate": 1e-3, "max_steps": 1})
    run = engine.setup(validated(tree), show_progress=False)
    indices = engine.step_pairs(run, 0)

    def margin() -> float:
        batch = collate_pairs([run.train_pairs.pairs[i] for i in indices], indices, run.tokenizer.pad_token_id)
        with torch.no_grad():
            logps, _ = engine.forward_pairs(run, batch, run.reference)
        ratio, desirable = logps.policy_chosen - logps.ref_chosen, logps.labels
        assert desirable.any() and (~desirable).any()
        return float(ratio[desirable].mean() - ratio[~desirable].mean())

    before = margin()
    engine.train_step(run, 0)
    assert margin() > before + 1e-3


def test_paired_loss_refuses_unpaired_data(registered, tiny_model_dir, tmp_path):
    """DPO on unpaired rows fails at setup with one line naming the loss and data.format."""
    from prefopt.errors import PrefoptError

    path = unpaired_file(tmp_path / "unpaired.jsonl", rows=4)
    tree = tiny_recipe(tiny_model_dir, path, tmp_path / "run", data={"format": "unpaired"})
    with pytest.raises(PrefoptError) as caught:
        engine.setup(validated(tree), show_progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "loss 'dpo'" in message and "data.format=unpaired" in message and "unpaired.jsonl" in message
