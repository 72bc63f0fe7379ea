"""Loading the policy (a causal LM, or a sequence scorer for a reward model), its tokenizer and a reference
model; fingerprints of weights. Adapters (LoRA and
every other PEFT type) are ``prefopt.models.peft``; quantized weights ``prefopt.models.quantization``."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Iterable

import torch
from torch import nn

from prefopt.errors import PrefoptError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str) -> str:
    """An embedded model name becomes the local directory of its converted checkpoint."""
    from prefopt.models.embedded import resolve_model_path as resolve_embedded

    return resolve_embedded(path)


def load_tokenizer(path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   key: str = "model.path"):
    """``key`` is the recipe key that named ``path``, for errors."""
    from transformers import AutoTokenizer

    path = _checked_local_path(path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        error = _tokenizer_error(path, key, exc)
        if error is None:
            raise
        raise error from None
    if tokenizer.pad_token_id is None:
        # Padding is always masked out, so any id will do; EOS is what most causal LMs use.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str,
    *,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    key: str = "model.path",
    quantization=None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """``key`` is the recipe key that named ``path``, for errors (its ``trust_remote_code`` is its sibling).
    ``quantization`` (section ``model.quantization``) loads the weights quantized, straight onto ``device``."""
    from transformers import AutoModelForCausalLM

    kwargs = _load_options(dtype, revision, trust_remote_code, attn_implementation)
    if quantization is not None:
        kwargs.update(_quantized_load(quantization, DTYPES[dtype], device))
    model = _from_pretrained(AutoModelForCausalLM, path, kwargs, key, "cannot load a causal LM ({}); give a hub id, "
                             "a local directory with config.json and weights, or smollm2-135m-instruct")
    if quantization is not None:
        from prefopt.models.quantization import keep_cpu_layout

        keep_cpu_layout(model)
    return model


def _from_pretrained(auto_class, path: str, kwargs: dict, key: str, cannot: str) -> nn.Module:
    """``auto_class.from_pretrained`` on the checked path; a missing or unreadable model is one line naming ``key``
    (``cannot``, with ``{}`` for transformers' reason), and so is code the model ships that is not trusted."""
    path = _checked_local_path(path, key)
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise PrefoptError(f"{key} {path!r}: " + cannot.format(_first_line(exc))) from None
    except (ValueError, RuntimeError) as exc:
        if "trust_remote_code" in str(exc):
            raise _remote_code_error(path, key) from None
        if "Unrecognized model" in str(exc):  # no config.json, or one with no model_type: not a model folder
            raise PrefoptError(f"{key} {path!r}: " + cannot.format(_first_line(exc))) from None
        raise


def _load_options(dtype: str, revision: str | None, trust_remote_code: bool, attn_implementation: str | None) -> dict:
    """The ``from_pretrained`` options every model load shares; no attention backend: transformers' default."""
    options = {"dtype": DTYPES[dtype], "revision": revision, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        options["attn_implementation"] = attn_implementation
    return options


def load_sequence_scorer(
    path: str,
    *,
    pad_token_id: int | None,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    key: str = "model.path",
) -> nn.Module:
    """``path`` as a reward model: ``AutoModelForSequenceClassification`` with one output (num_labels=1), a fresh
    score head when the checkpoint is a causal LM. ``config.pad_token_id`` is set to ``pad_token_id`` (the
    tokenizer's pad token, its EOS when it has none), because a decoder scorer reads each sequence's score at
    its last token that is not that id; the ``reward_model`` judge sets the same. ``key`` names ``path`` in errors.
    """
    from transformers import AutoModelForSequenceClassification

    kwargs = {**_load_options(dtype, revision, trust_remote_code, attn_implementation), "num_labels": 1}
    try:
        model = _from_pretrained(
            AutoModelForSequenceClassification, path, kwargs, key, "cannot load it as a sequence scorer ({}); give a "
            "hub id or a local directory with config.json and weights of a causal LM (it gets a fresh score head) or "
            "of a reward model",
        )  # fmt: skip
    except RuntimeError as exc:
        if "mismatch" in str(exc):  # the checkpoint's score head has another number of outputs
            raise PrefoptError(f"{key} {path!r} has a score head with more than one output, and a reward model "
                               "here has one: start from its causal LM instead") from None
        raise
    model.config.pad_token_id = pad_token_id
    text_config = model.config.get_text_config()
    if text_config is not model.config:  # multimodal configs keep the decoder's settings apart
        text_config.pad_token_id = pad_token_id
    return model


def _quantized_load(quantization, dtype: torch.dtype, device) -> dict:
    """from_pretrained's arguments for quantized weights: bitsandbytes quantizes them as they load, in place
    on their device (a quantized model cannot be moved after)."""
    from prefopt.models.quantization import bnb_config, check_supported

    check_supported(quantization, device)
    return {"quantization_config": bnb_config(quantization, dtype), "device_map": {"": torch.device(device)}}


def _checked_local_path(path: str, key: str) -> str:
    """``path`` with ``~`` expanded; one that can only be local (``looks_local``) must be a folder.

    transformers takes a missing folder for a hub id and answers "Repo id must be in the form ...", which
    says nothing about the folder, so that case is caught here, before it is asked.
    """
    from prefopt.data.load import looks_local

    if not looks_local(path):
        return path
    local = os.path.expanduser(path)
    if os.path.isfile(local):
        raise PrefoptError(f"{key} {path!r} is a file; give the folder that holds config.json and the weights")
    if not os.path.isdir(local):
        start = "" if os.path.isabs(local) else f" (relative paths start at the current directory, {os.getcwd()})"
        raise PrefoptError(f"{key} {path!r}: no such folder; check {key}{start}")
    return local


def _tokenizer_error(path: str, key: str, exc: OSError | ValueError) -> PrefoptError | None:
    """The one-line error for a tokenizer transformers could not load; None for an unforeseen ValueError."""
    if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
        return _remote_code_error(path, key)
    if os.path.isdir(path) and not any(_is_tokenizer_file(name) for name in os.listdir(path)):
        return PrefoptError(
            f"{key} {path!r}: the folder has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...); "
            f"save the model's tokenizer there with tokenizer.save_pretrained({path!r})"
        )
    if isinstance(exc, OSError):
        return PrefoptError(f"{key} {path!r}: cannot load a tokenizer ({_first_line(exc)})")
    if "sentencepiece" in str(exc):
        return PrefoptError(f"{key} {path!r}: its tokenizer needs the sentencepiece package; pip install sentencepiece")
    return None


def _is_tokenizer_file(name: str) -> bool:
    """Files a tokenizer is read from (tokenizer_config.json alone is not one: it only points at them)."""
    return name in ("tokenizer.json", "vocab.json", "vocab.txt") or name.endswith((".model", ".tiktoken"))


def _remote_code_error(path: str, key: str) -> PrefoptError:
    section = key.rpartition(".")[0] or "model"
    return PrefoptError(f"{key} {path!r} ships its own code; set {section}.trust_remote_code=true if you trust it")


def add_lora(model: nn.Module, lora) -> nn.Module:
    """Wrap ``model`` with a fresh LoRA adapter (recipe section model.lora); only the adapter trains.
    ``prefopt.models.peft.add_adapter`` takes every adapter a recipe can name."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def fingerprint_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def base_weights_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the weights a reference would use: adapter tensors (of any PEFT type) excluded."""
    from prefopt.models.peft import base_weights_fingerprint as fingerprint

    return fingerprint(model)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights ``merge_and_unload`` would give, under transformers names, without changing ``model``
    (``prefopt.models.peft.merged_state_dict``: any PEFT type, quantized base weights dequantized)."""
    from prefopt.models.peft import merged_state_dict as merged

    return merged(model)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
