"""A Bradley-Terry reward model trained through the engine: the loss by hand and against TRL, a tiny run that
learns, the saved model as the reward_model judge reads it, resume, and the settings a reward model refuses."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from helpers import one_line_error, tiny_recipe, train_losses, validated
from prefopt import Task, TaskConfig, TaskData, engine, hookimpl
from prefopt.api.judge import JudgeContext
from prefopt.api.loss import PairLogps
from prefopt.errors import PrefoptError
from prefopt.forward.batching import collate_pairs
from prefopt.recipe import validate_tree
from prefopt.registry.loading import load_plugins
from prefopt.testing import PAIRS, pair_logps, preference_file, write_recipe
from prefopt_plugins.judges.reward_model import RewardModelJudge
from prefopt_plugins.losses.bradley_terry import BradleyTerry

F64 = torch.float64

# A separable toy set: every chosen response ends "great", every rejected one "dull", after the same words.
# Prompts end in a letter and responses start with a space, so tokenizing prompt + response as one text (the
# judge) gives the same ids as tokenizing them apart (the engine): the two score the same sequence.
TOPICS = ("film", "plot", "cast", "music", "ending", "script", "pace", "story", "camera", "sound", "set", "tone")
TOY = [(f"The {topic}", f" of this {topic} was great", f" of this {topic} was dull") for topic in TOPICS]


def bt(**options) -> BradleyTerry:
    return BradleyTerry(BradleyTerry.Config(**options))


def toy_data(tmp_path):
    """A dataset folder: 8 training pairs and 4 held-out ones (split test)."""
    folder = tmp_path / "toy"
    preference_file(folder / "train.jsonl", TOY[:8])
    preference_file(folder / "test.jsonl", TOY[8:])
    return folder


def rm_tree(model_dir, data_path, out, **sections):
    """A reward-model recipe on the tiny model: bradley_terry, no appended EOS, steps of 4 pairs."""
    loss = sections.pop("loss", {"name": "bradley_terry"})
    tree = tiny_recipe(model_dir, data_path, out, **sections)
    tree["loss"] = loss  # replaced whole: the helper's DPO options are not bradley_terry's
    tree["data"] = {**tree["data"], "append_eos": False, **sections.get("data", {})}
    return tree


# ----------------------------------------------------------------------------------------------------------
# the loss


def test_loss_by_hand():
    """Scores (r_c, r_r) = (2.0, 0.5) and (-1.0, 1.0):
    L_1 = -log sigmoid(1.5) = log(1 + e^-1.5) = 0.20141327798275246
    L_2 = -log sigmoid(-2)  = log(1 + e^2)    = 2.1269280110429727
    With center_rewards_coefficient 0.1 the penalty 0.1 * (r_c + r_r)^2 adds 0.1 * 2.5^2 = 0.625 to L_1 and
    0.1 * 0^2 = 0 to L_2. The rewards are the scores themselves."""
    logps = pair_logps([2.0, -1.0], [0.5, 1.0])  # float64
    out = bt()(logps)
    assert out.loss.tolist() == pytest.approx([0.20141327798275246, 2.1269280110429727], abs=1e-12)
    assert out.chosen_rewards.tolist() == [2.0, -1.0] and out.rejected_rewards.tolist() == [0.5, 1.0]
    assert not out.metrics

    centred = bt(center_rewards_coefficient=0.1)(logps)
    assert centred.loss.tolist() == pytest.approx([0.20141327798275246 + 0.625, 2.1269280110429727], abs=1e-12)
    assert centred.metrics["center_penalty"].tolist() == pytest.approx([0.625, 0.0], abs=1e-12)


def test_declarations():
    assert BradleyTerry.scores_sequences is True and BradleyTerry.requires_reference is False
    assert not BradleyTerry.requires_token_logps and not BradleyTerry.unpaired and not BradleyTerry.multi_reference
    with pytest.raises(ValueError):
        BradleyTerry.Config(center_rewards_coefficient=-0.1)


def trl_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, coefficient: float | None) -> torch.Tensor:
    """TRL's own ``RewardTrainer.compute_loss`` on scores we choose: the model is a stub whose logits are the
    scores (chosen rows first, as TRL's collator stacks them) and the trainer holds only what the method reads."""
    from trl import RewardTrainer

    scores = torch.cat([chosen, rejected]).unsqueeze(-1)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=coefficient),
        accelerator=SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    model = lambda **inputs: SimpleNamespace(logits=scores)  # noqa: E731
    inputs = {"input_ids": torch.zeros(2 * len(chosen), 3, dtype=torch.long),
              "attention_mask": torch.ones(2 * len(chosen), 3, dtype=torch.long)}
    return RewardTrainer.compute_loss(trainer, model, inputs)


@pytest.mark.parametrize("coefficient", [None, 0.01])
def test_equals_trl_reward_trainer(coefficient):
    """TRL averages -log sigmoid(r_c - r_r) (+ c (r_c + r_r)^2) over the batch; the engine averages our per-pair
    losses. Same float64 scores: same mean, and the same gradient for every score."""
    pytest.importorskip("trl")
    gen = torch.Generator().manual_seed(3)
    chosen, rejected = (4 * torch.randn(6, generator=gen, dtype=F64) for _ in range(2))
    ours_c, ours_r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    trl_c, trl_r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    ones = torch.ones(6, dtype=F64)
    logps = PairLogps(policy_chosen=ours_c, policy_rejected=ours_r, chosen_tokens=ones, rejected_tokens=ones)
    ours = bt(center_rewards_coefficient=coefficient or 0.0)(logps).loss.mean()
    theirs = trl_reward_loss(trl_c, trl_r, coefficient)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-12)
    ours.backward()
    theirs.backward()
    assert torch.allclose(ours_c.grad, trl_c.grad, atol=1e-12) and torch.allclose(ours_r.grad, trl_r.grad, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# training through the engine


def test_a_tiny_reward_model_learns_and_the_judge_reads_what_it_trained(tiny_model_dir, tmp_path):
    """4 steps (2 epochs of 8 pairs) with LoRA: the loss falls, on held-out pairs too, the saved folder is a
    one-output sequence classifier, and the reward_model judge scores a pair as the engine's forward does.

    Tolerance 1e-5: the engine scores with the LoRA adapter beside the weights and in a padded batch, the judge
    the merged weights in its own batches, so the two differ by float32 rounding (about 1e-7 relative over two
    layers, on scores of order 1), while reading the score one token early moves it by more than 0.1 here."""
    data = toy_data(tmp_path)
    tree = rm_tree(tiny_model_dir, data, tmp_path / "run",
                   data={"path": str(data), "eval_split": "test"},
                   model={"lora": {"r": 4, "alpha": 8}},
                   train={"batch_size": 4, "micro_batch_size": 2, "learning_rate": 3e-2, "max_steps": None,
                          "epochs": 2},
                   eval={"at_start": True, "task_metrics": False}, output={"save_model": True})
    run = engine.setup(validated(tree), show_progress=False)
    trainable = [name for name, p in run.policy.named_parameters() if p.requires_grad]
    assert any("score" in name for name in trainable) and any("lora_" in name for name in trainable)
    assert run.reference is None

    engine.fit(run, show_progress=False)
    batch = collate_pairs(run.train_pairs.pairs[:4], list(range(4)), run.tokenizer.pad_token_id)
    with torch.no_grad():
        logps, _ = engine.forward_pairs(run, batch, None)
    engine_scores = logps.policy_chosen.tolist() + logps.policy_rejected.tolist()
    summary = engine.finish(run)

    steps = [m for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert not any(key.startswith("logps/") for key in steps[0])  # the scores are the rewards/*
    assert steps[2]["loss"] + steps[3]["loss"] < steps[0]["loss"] + steps[1]["loss"]  # epoch 2 on the same pairs
    start, end = summary["eval_start"], summary["eval_end"]
    # held-out topics: the score learnt "great" over "dull", not the training pairs' words (log 2 = 0.69 at a tie)
    assert end["eval/loss"] < 0.1 < 0.5 < start["eval/loss"]
    assert end["eval/rewards/margins"] > 1 > start["eval/rewards/margins"] and end["eval/rewards/accuracies"] == 1.0
    assert "eval/entropy" not in end and not any(key.startswith("eval/logits/") for key in end)

    model_dir = tmp_path / "run" / "model"
    config = AutoConfig.from_pretrained(model_dir)
    assert config.architectures == ["LlamaForSequenceClassification"] and config.num_labels == 1
    assert config.pad_token_id == run.tokenizer.pad_token_id
    card = (model_dir / "README.md").read_text()
    assert "AutoModelForSequenceClassification" in card and "pipeline_tag: text-classification" in card

    judge = RewardModelJudge(RewardModelJudge.Config(path=str(model_dir), format="plain"), JudgeContext(device="cpu"))
    prompts = [TOY[pair.row][0] for pair in run.train_pairs.pairs[:4]]
    chosen = [TOY[pair.row][1] for pair in run.train_pairs.pairs[:4]]
    rejected = [TOY[pair.row][2] for pair in run.train_pairs.pairs[:4]]
    for prompt, response, pair in zip(prompts, chosen, run.train_pairs.pairs):  # the same sequence of ids
        assert list(run.tokenizer(prompt + response)["input_ids"]) == [*pair.prompt_ids, *pair.chosen_ids]
    judged = judge.scores(prompts * 2, chosen + rejected)
    one_token_early = judge.scores(prompts[:1], [chosen[0].removesuffix(" great")])
    judge.close()
    assert judged == pytest.approx(engine_scores, abs=1e-5, rel=0)
    assert abs(one_token_early[0] - engine_scores[0]) > 0.1  # what the tolerance tells apart


def test_resume_reproduces_the_uninterrupted_losses(tiny_model_dir, tmp_path):
    """Full fine-tuning, 4 steps in one go, against 2 steps, then the same run resumed from its last checkpoint
    to 4 (train.max_steps may change on resume; the schedule is constant, so the rate does not)."""
    data = toy_data(tmp_path)
    train, output = {"batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-2, "epochs": 2}, {"save_model": False}
    full = rm_tree(tiny_model_dir, data / "train.jsonl", tmp_path / "full", train={**train, "max_steps": None},
                   output=output)
    engine.train(validated(full), show_progress=False)

    first = rm_tree(tiny_model_dir, data / "train.jsonl", tmp_path / "resumed", train={**train, "max_steps": 2},
                    output=output)
    engine.train(validated(first), show_progress=False)
    rest = rm_tree(tiny_model_dir, data / "train.jsonl", tmp_path / "resumed", train={**train, "max_steps": None},
                   output=output)
    engine.train(validated(rest), show_progress=False)

    full_losses, resumed_losses = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
    assert list(resumed_losses) == [1, 2, 3, 4]
    assert len(set(full_losses.values())) == 4  # the steps differ, so the comparison below means something
    for step, value in full_losses.items():
        assert resumed_losses[step] == pytest.approx(value, rel=0, abs=1e-6), step


class ProbeTask(Task):
    """A test task: the sample pairs as its data, built after loading the model it is handed, whose class it
    records (a task samples its data from that model)."""

    name = "rm_probe_task"
    Config = TaskConfig
    loaded: list[str] = []

    def build(self, ctx) -> TaskData:
        ProbeTask.loaded.append(type(ctx.load_model()).__name__)
        folder = Path(ctx.cache_dir)
        return TaskData(train=preference_file(folder / "train.jsonl"), eval=preference_file(folder / "eval.jsonl",
                                                                                            PAIRS[8:]))


@hookimpl
def prefopt_register_tasks():
    return [ProbeTask]


def test_a_task_builds_its_data_with_the_causal_lm_and_the_scorer_trains(tiny_model_dir, tmp_path):
    """A reward model cannot generate, so the task gets model.path as a causal LM to sample from, and the
    policy that trains is the sequence classifier."""
    plugins = load_plugins(extra=[__name__])  # this module registers the task
    tree = rm_tree(tiny_model_dir, tmp_path, tmp_path / "run")
    tree["data"] = {"task": {"name": "rm_probe_task"}, "max_length": 48, "max_prompt_length": 24,
                    "append_eos": False}
    ProbeTask.loaded.clear()
    run = engine.setup(validate_tree(tree, plugins, "probe"), plugins, show_progress=False)
    assert ProbeTask.loaded == ["LlamaForCausalLM"]
    assert type(run.accelerator.unwrap_model(run.policy)).__name__ == "LlamaForSequenceClassification"
    assert len(run.eval_pairs) == 4


# ----------------------------------------------------------------------------------------------------------
# what a reward model refuses


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_a_packed_layout_is_one_line(layout, tiny_model_dir, pairs_file, tmp_path, capsys):
    tree = rm_tree(tiny_model_dir, pairs_file, tmp_path / "run", train={"layout": layout})
    err = one_line_error(capsys, ["validate", str(write_recipe(tree, tmp_path / "rm.yaml"))])
    assert f"train.layout={layout}" in err and "set train.layout=padded" in err


def test_eval_samples_is_one_line(tiny_model_dir, pairs_dir, tmp_path, capsys):
    samples = {"num_prompts": 2, "sampler": {"name": "transformers", "max_new_tokens": 4}}
    tree = rm_tree(tiny_model_dir, pairs_dir, tmp_path / "run", data={"path": str(pairs_dir), "eval_split": "test"},
                   eval={"samples": samples})
    err = one_line_error(capsys, ["validate", str(write_recipe(tree, tmp_path / "rm.yaml"))])
    assert "eval.samples" in err and "cannot sample" in err


def test_the_quickstart_as_a_reward_model_lists_every_problem_at_once():
    """The DPO quickstart with loss.name=bradley_terry: it appends EOS, scores the task by sampling, and samples
    completions while it trains; the three are named together, each with its fix."""
    from prefopt.recipe import load_recipe

    with pytest.raises(PrefoptError) as error:
        load_recipe("recipes/dpo/quickstart.yaml", ["loss={name: bradley_terry}"])
    message = str(error.value)
    assert "3 problems" in message
    for fix in ("set data.append_eos=false", "set eval.task_metrics=false", "remove eval.samples"):
        assert fix in message


def test_an_algorithm_and_an_existing_adapter_are_refused(tiny_model_dir, pairs_file, tmp_path):
    tree = rm_tree(tiny_model_dir, pairs_file, tmp_path / "run", algorithm={"name": "stepwise", "stages": 2},
                   model={"adapter": str(tmp_path)})
    with pytest.raises(PrefoptError) as error:
        validated(tree)
    assert "remove the algorithm section" in str(error.value) and "model.adapter" in str(error.value)


def test_a_reward_model_loss_mixes_only_with_its_kind(tiny_model_dir, pairs_file, tmp_path):
    tree = rm_tree(tiny_model_dir, pairs_file, tmp_path / "run",
                   loss={"name": "mix", "components": [{"name": "bradley_terry"}, {"name": "simpo"}]})
    with pytest.raises(PrefoptError, match="cannot be mixed"):
        validated(tree)


def test_the_score_is_not_a_log_prob(tiny_model_dir, pairs_file, tmp_path):
    """At step 0 the scores come from a fresh head on random weights: finite, of either sign, and not the summed
    log-probs a causal LM would give (those are all negative, tens of nats on these responses)."""
    run = engine.setup(validated(rm_tree(tiny_model_dir, pairs_file, tmp_path / "run")), show_progress=False)
    batch = collate_pairs(run.train_pairs.pairs[:4], list(range(4)), run.tokenizer.pad_token_id)
    with torch.no_grad():
        logps, output = engine.forward_pairs(run, batch, None)
    scores = torch.cat([logps.policy_chosen, logps.policy_rejected])
    assert torch.isfinite(scores).all() and scores.abs().max() < 5
    assert torch.equal(output.chosen_rewards, logps.policy_chosen)
    assert logps.chosen_tokens.tolist() == [float(len(p.chosen_ids)) for p in run.train_pairs.pairs[:4]]
    assert not math.isnan(float(output.loss.mean()))


@pytest.mark.parametrize("loader, what", [("load_causal_lm", "cannot load a causal LM"),
                                          ("load_sequence_scorer", "cannot load it as a sequence scorer")])
def test_a_folder_without_a_model_is_one_line_naming_the_key(tmp_path, loader, what):
    from prefopt.errors import PrefoptError
    from prefopt.models import loading

    (tmp_path / "empty").mkdir()
    kwargs = {"pad_token_id": 0} if loader == "load_sequence_scorer" else {}
    with pytest.raises(PrefoptError) as caught:
        getattr(loading, loader)(str(tmp_path / "empty"), **kwargs)
    message = str(caught.value)
    assert message.startswith(f"model.path '{tmp_path / 'empty'}': {what} (") and "\n" not in message
