"""ExPO: a better-aligned model by extrapolating from an SFT checkpoint through an aligned one.

Zheng, Wang, Ji, Huang, Peng, "Model Extrapolation Expedites Alignment", ACL 2025, arXiv:2404.16792.
With ``theta0`` the SFT checkpoint, ``theta1`` the aligned (e.g. DPO) checkpoint and
``delta = theta1 - theta0``, the paper's Eq. 6 is::

    theta2 = theta1 + a_paper * delta = theta0 + (1 + a_paper) * delta,    a_paper > 0

Here the weights are parametrized the common way, from the SFT checkpoint::

    theta = theta_sft + alpha * (theta_aligned - theta_sft),    alpha = 1 + a_paper

so ``alpha = 1`` is the aligned model itself, ``alpha > 1`` extrapolates (the paper's method; its official
code suggests a_paper of 0.3 to 0.5, i.e. alpha 1.3 to 1.5) and ``alpha < 1`` interpolates back towards
SFT. Extrapolation assumes the aligned model moved only a little along a good direction; when ``delta``
is large (long training, a high learning rate) it overshoots and the model degrades.

Every parameter is combined in float32, whatever the loading dtype, and cast back to it. Buffers are
not weights anyone trained, so the aligned model's are kept. Parameters are updated in place on the
aligned model, one ``nn.Parameter`` at a time, so weights tied in it (input and output embeddings)
stay one tensor and are saved as such.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import shutil
from pathlib import Path

import torch
from torch import nn

from prefopt.errors import PrefoptError
from prefopt.models.loading import DTYPES, load_causal_lm, load_tokenizer, resolve_model_path
from prefopt.paths import replace_dir, staging_dir

__all__ = ["extrapolate"]

log = logging.getLogger(__name__)

RECORD_FILE = "extrapolation.json"


def extrapolate(
    sft: str,
    aligned: str,
    out: str | Path,
    *,
    alpha: float,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Write ``sft + alpha * (aligned - sft)`` to ``out`` as a Hugging Face model with the aligned tokenizer.

    ``sft`` and ``aligned`` are hub ids, local directories or the embedded ``smollm2-135m-instruct``;
    ``aligned`` may also be a PEFT adapter directory, merged into its base first. ``dtype`` is the
    precision the models are loaded in and the result is saved in (the arithmetic is float32 either
    way). Returns the output directory.
    """
    alpha = _check_alpha(alpha)
    if dtype not in DTYPES:
        raise PrefoptError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out)
    _check_out(out, overwrite, sft, aligned)

    aligned_model, tokenizer, aligned_base = _load_aligned(aligned, dtype, trust_remote_code)
    sft_model = load_causal_lm(resolve_model_path(sft), dtype=dtype, trust_remote_code=trust_remote_code)
    _check_same_architecture(sft_model, aligned_model)
    _combine(sft_model, aligned_model, alpha, show_progress)
    del sft_model  # the result lives in aligned_model; free the second copy before saving

    # Rounded so that alpha 1.3 records paper_alpha 0.3, not 0.30000000000000004.
    paper_alpha = float(f"{alpha - 1:.12g}")
    record = {"sft": sft, "aligned": aligned, "alpha": alpha, "paper_alpha": paper_alpha, "dtype": dtype}
    if aligned_base is not None:
        record["aligned_adapter_base"] = aligned_base
    _write(aligned_model, tokenizer, record, out, overwrite)
    log.info("wrote %s: sft + %g * (aligned - sft)", out, alpha)
    return out


def _check_alpha(alpha) -> float:
    # bool is an int; alpha=True is a mistake, not 1.0.
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise PrefoptError(f"alpha {alpha!r}: must be a finite number (alpha = 1 + the paper's alpha, e.g. 1.3)")
    alpha = float(alpha)
    if alpha == 1:
        log.info("alpha = 1: the output is a copy of the aligned model")
    elif 0 <= alpha < 1:
        log.warning("alpha = %g < 1 interpolates between the SFT and aligned models; ExPO extrapolates "
                    "with alpha > 1", alpha)
    elif alpha < 0:
        log.warning("alpha = %g < 0 moves past the SFT model, away from the aligned one", alpha)
    return alpha


def _check_out(out: Path, overwrite: bool, *inputs: str) -> None:
    if out.exists() and not out.is_dir():
        raise PrefoptError(f"output {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PrefoptError(f"output {out}: exists and is not empty; choose another directory or overwrite it "
                           "(--overwrite)")
    # Replacing an input would delete weights that are still being read.
    for given in inputs:
        if Path(given).exists():
            source, target = Path(given).resolve(), out.resolve()
            if source == target or target in source.parents:
                raise PrefoptError(f"output {out}: holds the input model {given}; write the result elsewhere")


def _load_aligned(aligned: str, dtype: str, trust_remote_code: bool):
    """The aligned model, its tokenizer, and the base it was merged into (None unless a PEFT adapter)."""
    adapter_config = Path(aligned) / "adapter_config.json"
    if not adapter_config.is_file():
        path = resolve_model_path(aligned)
        model = load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code)
        return model, load_tokenizer(path, trust_remote_code=trust_remote_code), None

    from peft import PeftModel

    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base:
        raise PrefoptError(f"{adapter_config}: no base_model_name_or_path, so the adapter's base model is unknown")
    base_path = resolve_model_path(base)
    model = load_causal_lm(base_path, dtype=dtype, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, aligned).merge_and_unload()
    # A trained adapter directory usually carries its tokenizer (prefopt writes one); else the base's is it.
    has_tokenizer = (Path(aligned) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(aligned if has_tokenizer else base_path, trust_remote_code=trust_remote_code)
    log.info("merged the LoRA adapter %s into its base %s", aligned, base)
    return model, tokenizer, base


def _check_same_architecture(sft: nn.Module, aligned: nn.Module) -> None:
    """Same parameter names and shapes, else one line naming the first parameter that differs."""
    # named_parameters() lists a tied tensor once, so a tie present in only one model shows up as a name
    # the other lacks.
    sft_params = dict(sft.named_parameters())
    aligned_params = dict(aligned.named_parameters())
    problem = None
    for name, param in aligned_params.items():
        if name not in sft_params:
            problem = f"parameter {name!r} is in the aligned model but not in the SFT model"
        elif sft_params[name].shape != param.shape:
            problem = (f"parameter {name!r} has shape {tuple(sft_params[name].shape)} in the SFT model and "
                       f"{tuple(param.shape)} in the aligned model")
        if problem:
            break
    if problem is None:
        extra = next((name for name in sft_params if name not in aligned_params), None)
        if extra is not None:
            problem = f"parameter {extra!r} is in the SFT model but not in the aligned model"
    if problem is None and type(sft) is not type(aligned):
        problem = f"the SFT model is a {type(sft).__name__} and the aligned model a {type(aligned).__name__}"
    if problem is None:
        return
    ties = [getattr(m.config, "tie_word_embeddings", None) for m in (sft, aligned)]
    if ties[0] != ties[1]:
        problem += f" (tie_word_embeddings is {ties[0]} in the SFT model and {ties[1]} in the aligned model)"
    raise PrefoptError(f"cannot extrapolate: {problem}; both must be the same architecture")


@torch.no_grad()
def _combine(sft: nn.Module, aligned: nn.Module, alpha: float, show_progress: bool) -> None:
    """aligned <- sft + alpha * (aligned - sft), parameter by parameter, in place."""
    from tqdm.auto import tqdm

    sft_params = dict(sft.named_parameters())
    params = list(aligned.named_parameters())
    for name, param in tqdm(params, desc="extrapolating", unit="tensor", disable=not show_progress):
        theta1 = param.detach().float()
        theta0 = sft_params[name].detach().to(device=param.device, dtype=torch.float32)
        # The paper's form theta1 + (alpha - 1) * delta rather than theta0 + alpha * delta: the same
        # number, but alpha = 1 then gives the aligned weights bit for bit.
        theta1.add_(theta1 - theta0, alpha=alpha - 1)
        param.copy_(theta1)  # copy_ casts back to the parameter's dtype and keeps the Parameter (and its ties)


def _write(model: nn.Module, tokenizer, record: dict, out: Path, overwrite: bool) -> None:
    """Build the output in a private directory beside ``out``, then move it into place in one rename."""
    staging = staging_dir(out, "extrapolating")
    try:
        model.save_pretrained(staging)  # transformers 5 writes safetensors only
        tokenizer.save_pretrained(staging)
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
        _replace(staging, out, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a no-op once the rename succeeded


def _replace(staging: Path, out: Path, overwrite: bool) -> None:
    filled = out.is_dir() and any(out.iterdir())  # someone filled it while the models were loading
    if filled and not overwrite:
        raise PrefoptError(f"output {out}: exists and is not empty; choose another directory or overwrite it "
                           "(--overwrite)")
    replace_dir(staging, out)  # ``out`` is always either the old output or the complete new one
