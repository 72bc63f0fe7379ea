"""Quantized base weights (recipe section ``model.quantization``): 4-bit or 8-bit through bitsandbytes.

The base weights load quantized and stay frozen; only a PEFT adapter trains over them (QLoRA, Dettmers et
al., arXiv 2305.14314). Whether bitsandbytes can run here is asked before the load, so a machine it does not
support gets one line naming ``model.quantization`` rather than a traceback from deep inside transformers.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from prefopt.errors import PrefoptError

KEY = "model.quantization"

# bitsandbytes (0.50) warns on import, on a CPU with AVX-512 BF16, that the hub kernel for its repacked CPU
# layout is missing; peft imports bitsandbytes whenever it is installed, so every run and every
# ``prefopt validate`` of a recipe with model.peft would print it. prefopt never uses that layout
# (``keep_cpu_layout``), so the warning says nothing about a prefopt run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def bnb_config(quantization, dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for the recipe's section; 4-bit layers compute in ``dtype``."""
    from transformers import BitsAndBytesConfig

    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant, bnb_4bit_compute_dtype=dtype,
    )


def check_supported(quantization, device: torch.device | str) -> None:
    """One line naming ``model.quantization`` when bitsandbytes is missing or cannot run on ``device``."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PrefoptError(f"{KEY} loads {quantization.bits}-bit weights through bitsandbytes, which is not "
                           "installed: pip install bitsandbytes (or remove model.quantization)")
    import bitsandbytes

    kind = torch.device(device).type
    supported = sorted(getattr(bitsandbytes, "supported_torch_devices", ()))
    if kind not in supported:
        raise PrefoptError(
            f"{KEY}: bitsandbytes {bitsandbytes.__version__} cannot run {quantization.bits}-bit weights on this "
            f"machine's {kind} device (it supports {', '.join(supported) or 'none'}); train on a supported device "
            "(a CUDA GPU) or remove model.quantization"
        )


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (or the base model under a PEFT wrapper) holds bitsandbytes-quantized weights."""
    return any(quantized_layer(module) for module in model.modules())


def quantized_layer(module: nn.Module) -> bool:
    """Whether ``module``'s own weight is a bitsandbytes 4-bit or 8-bit tensor (a PEFT layer only points at its
    base layer's)."""
    weight = module._parameters.get("weight")
    return type(weight).__name__ in ("Params4bit", "Int8Params")


def keep_cpu_layout(model: nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU kernel on the first forward without gradients.

    bitsandbytes (0.50) repacks a 4-bit layer in place when it first runs in eval mode on a CPU with
    AVX-512 BF16: the block scales are rounded to bfloat16, so the weights change between the training
    forwards before it and every forward after (the reference forward triggers it mid-run), and layers whose
    input is narrower than one quantization block (64) fail outright. Off, every forward reads the weights
    as they were loaded.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
