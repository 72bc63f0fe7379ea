"""Fixtures for the data tests: the real SmolLM2 tokenizer (built once), a BOS-adding variant, no network."""

from __future__ import annotations

import copy

import datasets
import huggingface_hub.constants
import pytest
from transformers import AutoTokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session", autouse=True)
def offline_and_private_cache(tmp_path_factory):
    """Keep datasets' Arrow cache out of the home directory and make any hub call fail at once.

    Offline mode turns the hub's five network retries (about 20 s) into an immediate ConnectionError,
    which is what an unreachable hub produces in the end.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm2_package_dir):
    """SmolLM2-135M-Instruct's tokenizer: bos <|im_start|> (1), eos = pad = <|im_end|> (2), adds no BOS."""
    return AutoTokenizer.from_pretrained(str(smollm2_package_dir), gguf_file=GGUF_FILE)


@pytest.fixture(scope="session")
def bos_tokenizer(smollm_tokenizer):
    """The same tokenizer, made to prepend BOS like Llama's, to show a BOS is never doubled."""
    tokenizer = copy.deepcopy(smollm_tokenizer)
    tokenizer.add_bos_token = True
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id
    return tokenizer
