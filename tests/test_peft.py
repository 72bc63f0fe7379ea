"""PEFT methods beyond plain LoRA (DoRA, rsLoRA, PiSSA and OLoRA starts, IA3, LoHa, LoKr), a start from an
existing adapter with that adapter as the reference, quantized base weights, and merging every one of them."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from helpers import one_line_error, tiny_recipe, validated
from prefopt import engine
from prefopt.errors import PrefoptError
from prefopt.forward.batching import collate_pairs
from prefopt.forward.logprobs import sequence_logps
from prefopt.models.peft import merged_state_dict
from prefopt.testing import write_recipe

METHODS = {
    "dora": {"peft": {"type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": "all-linear"}},
    "rslora": {"peft": {"type": "lora", "r": 4, "lora_alpha": 8, "use_rslora": True}},
    "pissa": {"peft": {"type": "LORA", "r": 4, "init_lora_weights": "pissa", "target_modules": "all-linear"}},
    "olora": {"peft": {"type": "LORA", "r": 4, "init_lora_weights": "olora"}},
    "sft-adapter": {"adapter": None},  # the sft_adapter fixture's folder
}
# Where the reference comes from: the base model (the adapter starts as the identity), else the initial
# policy, adapter included (a cache computed from it, or a frozen copy of the initial adapter live).
BASE_SOURCE = "policy with its LoRA adapter disabled"
INITIAL_SOURCE = {"cache": "initial policy (base weights and adapter)",
                  "live": "policy with a frozen copy of its initial adapter"}


def _with_random_adapter(model_dir, seed: int, **lora):
    """The tiny model with a LoRA adapter that does something (B random, not zero), as SFT would leave it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    options = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


@pytest.fixture()
def sft_adapter(tiny_model_dir, tmp_path):
    folder = tmp_path / "sft-adapter"
    _with_random_adapter(tiny_model_dir, seed=1).save_pretrained(folder)
    return folder


def _model_section(tiny_model_dir, method: str, sft_adapter) -> dict:
    section = copy.deepcopy(METHODS[method])
    if "adapter" in section:
        section["adapter"] = str(sft_adapter)
    return {"path": str(tiny_model_dir), **section}


def _run(tiny_model_dir, pairs_file, out, model: dict, **sections):
    sections = {"train": {"learning_rate": 1e-2, "max_steps": 2}, **sections}
    tree = tiny_recipe(tiny_model_dir, pairs_file, out, model=model, **sections)
    return engine.setup(validated(tree), show_progress=False)


def _batch(run, count: int = 4):
    return collate_pairs(run.train_pairs.pairs[:count], range(count), run.tokenizer.pad_token_id)


def _policy_logps(run, batch) -> torch.Tensor:
    model = run.accelerator.unwrap_model(run.policy)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        sums = sequence_logps(model, batch).sums
    model.train(was_training)
    return sums


def _base_logps(tiny_model_dir, batch) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        return sequence_logps(base, batch).sums


def _logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("kind", ["cache", "live"])
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_against_its_initial_model_and_saves_a_merged_model_equal_to_the_adapter_model(
    method, kind, tiny_model_dir, pairs_file, sft_adapter, tmp_path
):
    from transformers import AutoModelForCausalLM

    run = _run(tiny_model_dir, pairs_file, tmp_path / "run", _model_section(tiny_model_dir, method, sft_adapter),
               reference={"kind": kind}, output={"save_model": True})
    starts_at_base = method in ("dora", "rslora")
    assert run.summary["reference"]["source"] == (BASE_SOURCE if starts_at_base else INITIAL_SOURCE[kind])
    batch = _batch(run)
    # Step 0: the reference is the initial policy. Live, it is the same computation (equal to float rounding
    # of DoRA's norm); the cache was filled in other batches, whose padding moves the sums by ~1e-5.
    gap = (_policy_logps(run, batch) - run.reference(batch)[0].sums).abs().max()
    assert gap < (2e-5 if kind == "live" else 1e-4)
    trainable = {n: p.detach().clone() for n, p in run.policy.named_parameters() if p.requires_grad}
    losses = [engine.train_step(run, step)["loss"] for step in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = [n for n, p in run.policy.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert moved, "the adapter must train"

    ids = torch.randint(3, len(run.tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))
    adapter_logits = _logits(run.accelerator.unwrap_model(run.policy), ids)
    engine.finish(run)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert not any(".base_layer" in n or "lora_" in n for n in merged.state_dict())
    # Logits of the tiny model are of order 1: merging sums W + BA once instead of x@W + x@A@B per call, a
    # float32 rounding difference of ~1e-7 that 1e-5 bounds with room to spare.
    torch.testing.assert_close(_logits(merged, ids), adapter_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("peft", [{"type": "IA3"}, {"type": "LOHA", "r": 4}, {"type": "LOKR", "r": 4}])
def test_other_tuner_types_train_and_save_merged(peft, tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    run = _run(tiny_model_dir, pairs_file, tmp_path / "run", {"path": str(tiny_model_dir), "peft": peft},
               output={"save_model": True})
    assert run.summary["reference"]["source"] == f"policy with its {peft['type']} adapter disabled"
    assert torch.isfinite(torch.tensor(engine.train_step(run, 0)["loss"]))
    ids = torch.randint(3, len(run.tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))
    adapter_logits = _logits(run.accelerator.unwrap_model(run.policy), ids)
    engine.finish(run)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    torch.testing.assert_close(_logits(merged, ids), adapter_logits, rtol=0, atol=1e-5)  # float32 rounding


@pytest.mark.parametrize("kind", ["cache", "live"])
def test_an_adapter_start_is_held_to_the_initial_adapter_not_to_the_base_model(
    kind, tiny_model_dir, pairs_file, sft_adapter, tmp_path
):
    run = _run(tiny_model_dir, pairs_file, tmp_path / "run", {"path": str(tiny_model_dir), "adapter": str(sft_adapter)},
               reference={"kind": kind})
    batch = _batch(run)
    reference = run.reference(batch)[0].sums
    base = _base_logps(tiny_model_dir, batch)
    # The adapter moves sequence log-probs by tenths of nats, a thousand times the cache's rounding: the base
    # model would be a different reference.
    assert (reference - base).abs().max() > 0.1
    step_one = engine.train_step(run, 0)  # its forward runs on the initial weights: log-ratios ~0
    # DPO's rewards are beta x log-ratio (beta 0.1): zero live, cache padding rounding (~1e-5 nats) otherwise
    assert abs(step_one["rewards/chosen"]) < 1e-5 and abs(step_one["rewards/rejected"]) < 1e-5
    engine.train_step(run, 1)
    assert reference.equal(run.reference(batch)[0].sums)  # the reference stays at the initial adapter


def test_the_reference_cache_key_covers_the_initial_adapter(tiny_model_dir, pairs_file, tmp_path):
    # seeds no other test uses: the cache is shared by the session's tests, and this one counts its hits
    other = tmp_path / "other-adapter"
    _with_random_adapter(tiny_model_dir, seed=12).save_pretrained(other)
    first = tmp_path / "first-adapter"
    _with_random_adapter(tiny_model_dir, seed=11).save_pretrained(first)

    def weights(out, **model):
        run = _run(tiny_model_dir, pairs_file, tmp_path / out, {"path": str(tiny_model_dir), **model})
        return run.summary["reference"]["weights"], run.summary["reference"]["caches"][0]["hit"]

    start, hit = weights("a", adapter=str(first))
    assert not hit
    assert weights("b", adapter=str(first)) == (start, True)  # the same adapter: the same cache
    assert weights("c", adapter=str(other))[0] != start
    base, _ = weights("d", lora={"r": 4})
    assert base not in (start, weights("c", adapter=str(other))[0])


def test_trdpo_sync_from_an_adapter_start_follows_the_adapter_from_where_it_starts(
    tiny_model_dir, pairs_file, sft_adapter, tmp_path
):
    from safetensors.torch import load_file

    run = _run(tiny_model_dir, pairs_file, tmp_path / "run", {"path": str(tiny_model_dir), "adapter": str(sft_adapter)},
               reference={"sync": {"mode": "hard", "every": 2}})
    followed = run.reference.following.weights.tensors
    saved = load_file(str(sft_adapter / "adapter_model.safetensors"))
    assert len(followed) == len(saved)
    for name, tensor in followed.items():  # the loaded adapter, not a fresh zero B
        key = name.replace(".default", "")
        torch.testing.assert_close(tensor, saved[key], rtol=0, atol=0, msg=name)
    batch = _batch(run)
    at_start = run.reference(batch)[0].sums
    torch.testing.assert_close(at_start, _policy_logps(run, batch), rtol=0, atol=2e-5)
    engine.train_step(run, 0)
    assert at_start.equal(run.reference(batch)[0].sums)  # no sync yet
    engine.train_step(run, 1)  # hard sync: the reference is the policy now
    torch.testing.assert_close(run.reference(batch)[0].sums, _policy_logps(run, batch), rtol=0, atol=2e-5)
    assert (run.reference(batch)[0].sums - at_start).abs().max() > 1e-4


def test_a_resumed_adapter_start_keeps_the_initial_adapter_as_its_reference(
    tiny_model_dir, pairs_file, sft_adapter, tmp_path
):
    model = {"path": str(tiny_model_dir), "adapter": str(sft_adapter)}
    first = _run(tiny_model_dir, pairs_file, tmp_path / "run", model, reference={"kind": "live"})
    batch = _batch(first)
    initial = first.reference(batch)[0].sums
    engine.fit(first, show_progress=False)
    engine.finish(first)
    resumed = _run(tiny_model_dir, pairs_file, tmp_path / "run", model, reference={"kind": "live"},
                   train={"learning_rate": 1e-2, "max_steps": 3})
    assert resumed.start_step == 2
    assert (_policy_logps(resumed, batch) - initial).abs().max() > 1e-4  # the checkpoint's adapter trains on
    torch.testing.assert_close(resumed.reference(batch)[0].sums, initial, rtol=0, atol=0)


# --- merged weights (the vLLM sampler's weight sync) ----------------------------------------------


def _peft_model(tiny_model_dir, config):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move every adapter off its identity start, as training would
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _configs():
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig

    targets = ["q_proj", "v_proj", "down_proj"]
    return {
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets),
        "pissa": LoraConfig(r=4, init_lora_weights="pissa", target_modules=targets),
        "lora-bias": LoraConfig(r=4, lora_bias=True, target_modules=["q_proj", "down_proj"]),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "loha": LoHaConfig(r=4, target_modules=targets),
        "lokr": LoKrConfig(r=4, target_modules=targets),
    }


@pytest.mark.parametrize("method", ["dora", "pissa", "lora-bias", "ia3", "loha", "lokr"])
def test_merged_state_dict_is_peft_merge_for_every_method_and_leaves_the_model_alone(method, tiny_model_dir,
                                                                                      tmp_path):
    if method == "lora-bias":  # LoRA's own bias merges into the base layer's, so that layer needs one
        from prefopt.testing import tiny_model

        tiny_model_dir = tiny_model(tmp_path / "biased", attention_bias=True, mlp_bias=True)
    model = _peft_model(tiny_model_dir, _configs()[method])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        # the same arithmetic on the same layer (a copy of it): equal to float32 rounding
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any((merged[n] - base[n]).abs().max() > 1e-3 for n in base)  # the adapter is in the merged weights
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


# --- quantized base weights ----------------------------------------------------------------------

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@needs_bnb
@pytest.mark.parametrize("kind", ["cache", "live"])
def test_4bit_base_weights_train_a_lora_adapter_and_merge_into_full_precision_weights(
    kind, tiny_model_dir, pairs_file, tmp_path
):
    from transformers import AutoModelForCausalLM

    run = _run(tiny_model_dir, pairs_file, tmp_path / "run",
               {"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}, "quantization": {"bits": 4}},
               reference={"kind": kind}, output={"save_model": True})
    model = run.accelerator.unwrap_model(run.policy)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(layer.weight).__name__ == "Params4bit"
    batch = _batch(run)
    before = run.reference(batch)[0].sums
    assert (_policy_logps(run, batch) - before).abs().max() < 1e-4
    losses = [engine.train_step(run, step)["loss"] for step in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert before.equal(run.reference(batch)[0].sums)  # the no-grad reference forward left the weights alone
    ids = torch.randint(3, len(run.tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))
    adapter_logits = _logits(model, ids)
    engine.finish(run)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert getattr(merged.config, "quantization_config", None) is None
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    # A 4-bit layer computes x @ dequantized(W) in float32, which is what the merged weights hold: float32
    # rounding on logits of order 1.
    torch.testing.assert_close(_logits(merged, ids), adapter_logits, rtol=0, atol=1e-5)


@needs_bnb
def test_merging_a_non_lora_adapter_into_quantized_weights_is_refused(tiny_model_dir, tmp_path):
    from peft import IA3Config, get_peft_model

    from prefopt.models.loading import load_causal_lm
    from prefopt.recipe.schema import QuantizationConfig

    base = load_causal_lm(str(tiny_model_dir), quantization=QuantizationConfig(bits=4))
    model = get_peft_model(base, IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(PrefoptError, match="merging a .*IA3.* into quantized weights is not supported; set "
                                           "output.merge_lora=false"):
        merged_state_dict(model)


@needs_bnb
def test_8bit_base_weights_train_a_lora_adapter(tiny_model_dir, pairs_file, tmp_path):
    run = _run(tiny_model_dir, pairs_file, tmp_path / "run",
               {"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}, "quantization": {"bits": 8}},
               reference={"kind": "live"})
    layer = run.accelerator.unwrap_model(run.policy).get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(layer.weight).__name__ == "Int8Params"
    losses = [engine.train_step(run, step)["loss"] for step in range(2)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[0] != losses[1]


def test_quantization_where_bitsandbytes_cannot_run_is_one_line(tiny_model_dir, pairs_file, tmp_path, capsys,
                                                                  monkeypatch):
    tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "run",
                       model={"path": str(tiny_model_dir), "lora": {"r": 4}, "quantization": {"bits": 4}})
    path = write_recipe(tree, tmp_path / "q.yaml")
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes

        monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})  # as a CUDA-only build says
        err = one_line_error(capsys, ["train", str(path), "--no-progress"])
        assert "model.quantization: bitsandbytes" in err and "cpu device (it supports cuda)" in err
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    err = one_line_error(capsys, ["train", str(path), "--no-progress"])
    assert "model.quantization" in err and "pip install bitsandbytes" in err


# --- recipe errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("model, expected", [
    ({"peft": {"type": "LORA", "use_doraa": True}},
     "model.peft.use_doraa: unknown field of peft's LoraConfig (did you mean 'use_dora'"),
    ({"peft": {"type": "LORA", "init_lora_weights": "pisa"}}, "model.peft.init_lora_weights: not a value it takes"),
    ({"peft": {"type": "LORA", "r": "sixteen"}}, "model.peft.r: Input should be a valid integer"),
    ({"peft": {"type": "LORRA"}}, "model.peft.type: unknown peft type 'LORRA' (did you mean 'LORA'"),
    ({"peft": {"type": "PREFIX_TUNING"}}, "model.peft.type: PREFIX_TUNING is prompt learning"),
    ({"peft": {"type": "LORA", "task_type": "SEQ_CLS"}}, "model.peft.task_type: set by prefopt"),
    ({"peft": {"type": "LORA"}, "lora": {"r": 4}}, "not model.lora and model.peft"),
    ({"adapter": "somewhere", "lora": {"r": 4}}, "not model.lora and model.adapter"),
    ({"quantization": {"bits": 4}}, "model.quantization freezes the base weights"),
    ({"quantization": {"bits": 3}, "lora": {}}, "model.quantization.bits: Input should be 4 or 8"),
])
def test_bad_peft_settings_are_one_line_recipe_errors(model, expected, tiny_model_dir, pairs_file, tmp_path, capsys):
    tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "run", model={"path": str(tiny_model_dir), **model})
    err = one_line_error(capsys, ["validate", str(write_recipe(tree, tmp_path / "r.yaml"))])
    assert expected in err


def test_peft_fields_are_validated_and_kept_as_peft_spells_them(tiny_model_dir, pairs_file, tmp_path):
    tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "run", model={
        "path": str(tiny_model_dir), "peft": {"type": "lora", "r": 16.0, "init_lora_weights": "pissa_niter_4"}})
    peft = validated(tree).model.peft
    assert peft == {"type": "LORA", "r": 16, "init_lora_weights": "pissa_niter_4"} and type(peft["r"]) is int


@pytest.mark.parametrize("make, expected", [
    (lambda folder: None, "no such folder"),
    (lambda folder: folder.mkdir(), "the folder has no adapter_config.json"),
])
def test_an_adapter_folder_that_is_not_one_is_a_one_line_error(make, expected, tiny_model_dir, pairs_file, tmp_path,
                                                               capsys):
    make(tmp_path / "adapter")
    tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "run",
                       model={"path": str(tiny_model_dir), "adapter": str(tmp_path / "adapter")})
    err = one_line_error(capsys, ["train", str(write_recipe(tree, tmp_path / "r.yaml")), "--no-progress"])
    assert f"model.adapter '{tmp_path / 'adapter'}': {expected}" in err


def test_sdpo_stages_refuse_an_adapter_start(tiny_model_dir, pairs_file, sft_adapter, tmp_path, capsys):
    """Stage 2 starts from stage 1's merged model: loading the adapter again would apply it twice."""
    tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "run", algorithm={"name": "stepwise", "stages": 2},
                       model={"path": str(tiny_model_dir), "adapter": str(sft_adapter)})
    err = one_line_error(capsys, ["validate", str(write_recipe(tree, tmp_path / "r.yaml"))])
    assert "onto which model.adapter would be loaded again" in err


def test_an_adapter_of_another_base_model_is_a_one_line_error(tiny_model_dir, pairs_file, tmp_path, capsys):
    from prefopt.testing import tiny_model

    wider = tiny_model(tmp_path / "wider", hidden_size=64, intermediate_size=128)
    _with_random_adapter(wider, seed=1).save_pretrained(tmp_path / "adapter")
    tree = tiny_recipe(tiny_model_dir, pairs_file, tmp_path / "run",
                       model={"path": str(tiny_model_dir), "adapter": str(tmp_path / "adapter")})
    err = one_line_error(capsys, ["train", str(write_recipe(tree, tmp_path / "r.yaml")), "--no-progress"])
    assert "does not fit model.path" in err


def test_the_short_lora_form_is_unchanged(tiny_model_dir, pairs_file, tmp_path):
    """``model.lora`` keeps its fields and its reference: the base weights' cache key, as before."""
    from prefopt.models.loading import base_weights_fingerprint
    from transformers import AutoModelForCausalLM

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}
    run = _run(tiny_model_dir, pairs_file, tmp_path / "run", {"path": str(tiny_model_dir), "lora": lora})
    assert run.summary["reference"]["source"] == BASE_SOURCE
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert run.summary["reference"]["weights"] == base_weights_fingerprint(base)


def test_an_adapter_peft_cannot_add_is_a_one_line_error_naming_the_key(tiny_model_dir):
    """peft's own refusal (here: no module matches target_modules) reaches the user as one line naming the key."""
    from prefopt.errors import PrefoptError
    from prefopt.models.loading import load_causal_lm
    from prefopt.models.peft import add_adapter
    from prefopt.recipe.schema import ModelConfig

    config = ModelConfig(path=str(tiny_model_dir), lora={"r": 2, "target_modules": ["no_such_module"]})
    with pytest.raises(PrefoptError, match=r"^model\.lora: peft cannot add this adapter to .*no_such_module"):
        add_adapter(load_causal_lm(str(tiny_model_dir)), config)
