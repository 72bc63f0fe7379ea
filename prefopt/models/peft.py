"""PEFT adapters: which one the policy trains, what its reference is, and its weights merged.

The policy's adapter comes from one of three recipe keys:

- ``model.lora``: the short form, a plain LoRA adapter (r, alpha, dropout, target modules);
- ``model.peft``: any peft tuner type with its own fields, ``{type: LORA, r: 16, use_dora: true}``, checked
  by peft's config class when the recipe loads (``check_peft_section``);
- ``model.adapter``: an existing adapter folder (say an SFT run's), trained on from where it stands.

The reference rule (``reference_is_base``): an adapter that starts as the identity (a fresh LoRA, DoRA or
rsLoRA whose B starts at zero, IA3 at ones, LoHa and LoKr at zero) leaves the policy equal to its base
model, so the base model with the adapter switched off is the reference, at no extra memory. Every other
start (an existing adapter, PiSSA and OLoRA, which move the base weights, a random init) is its own
reference: the base weights *and* the adapter as they start.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import types
import typing
from typing import Any, Literal, Union

import torch
from torch import nn

from prefopt.errors import PrefoptError, did_you_mean
from prefopt.models.loading import fingerprint_tensors, is_peft
from prefopt.models.quantization import quantized_layer

# Tuner types the engine cannot train as a plain trainable adapter, and why.
REFUSED_TYPES = {
    "ADALORA": "AdaLoRA reallocates ranks with a call after every optimizer step, which the engine does not make",
    "XLORA": "X-LoRA mixes several already trained LoRA adapters",
    "POLY": "Poly routes by task ids that every forward would have to pass",
}
# Where each tuner type keeps the switch that makes a fresh adapter the identity, and the values that do.
IDENTITY_INITS = {
    "LORA": ("init_lora_weights", (True, "gaussian")),
    "IA3": ("init_ia3_weights", (True,)),
    "LOHA": ("init_weights", (True,)),
    "LOKR": ("init_weights", (True,)),
}
# Fields prefopt sets itself.
SET_FOR_YOU = {"task_type": "CAUSAL_LM", "peft_type": None}


# --- the recipe's model.peft ---------------------------------------------------------------------


def check_peft_section(section: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[tuple[str, ...], str]]]:
    """``model.peft`` checked against peft's own config class: the section with its type spelt as peft
    spells it and its values as validated, and the problems found, each ``(key under model.peft, message)``.

    peft's config classes check few values themselves, so each field is also checked against the type
    peft annotates it with (``r: int``, ``init_lora_weights: bool | Literal[...]``) before the class is built.
    Imports peft (a few seconds), so only recipes that set ``model.peft`` pay for it.
    """
    if not isinstance(section, dict):
        return section, [((), "a mapping: {type: LORA, r: 16, ...} (a peft config type and its fields)")]
    fields = dict(section)
    kind, config_cls, problem = _config_class(fields.pop("type", None))
    if problem is not None:
        return section, [(("type",), problem)]
    problems = []
    for name, value in list(fields.items()):
        message = _field_problem(config_cls, name, value)
        if message is not None:
            problems.append(((name,), message))
        else:
            fields[name] = _validated(config_cls, name, value)
    if problems:
        return section, problems
    try:
        config_cls(**_for_peft(fields))
    except (TypeError, ValueError, ImportError) as exc:  # ImportError: an option whose package is missing
        named = [name for name in fields if re.search(rf"\b{re.escape(name)}\b", str(exc))]
        return section, [((named[0],) if named else (), _first_line(exc))]
    return {"type": kind, **fields}, []


def _config_class(name: Any) -> tuple[str, Any, str | None]:
    """A type name (case-insensitive) as peft spells it, its config class, and why there is none (else None)."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING, __version__
    from peft.config import PromptLearningConfig

    known = {str(getattr(key, "value", key)).upper(): cls for key, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    key = str(name).upper()
    if name is None:
        return key, None, "required: the peft config type, e.g. LORA, IA3, LOHA or LOKR"
    if key not in known:
        return key, None, (f"unknown peft type {name!r}{did_you_mean(key, known)}; peft {__version__} has "
                           f"{', '.join(sorted(known))}")
    if key in REFUSED_TYPES:
        return key, None, f"{key} cannot train here: {REFUSED_TYPES[key]}"
    if issubclass(known[key], PromptLearningConfig):
        return key, None, (f"{key} is prompt learning: it adds virtual tokens to every sequence, which the "
                           "engine's per-token log-probs do not expect; use a tuner type (LORA, IA3, LOHA, LOKR, ...)")
    return key, known[key], None


def _field_problem(config_cls, name: str, value: Any) -> str | None:
    """What is wrong with one field of ``model.peft``, or None."""
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    if name in SET_FOR_YOU:
        if SET_FOR_YOU[name] is not None and str(value).upper() == SET_FOR_YOU[name]:
            return None
        return f"set by prefopt ({name} is {SET_FOR_YOU[name] or 'the type key'}); remove it"
    if name not in fields:
        return f"unknown field of peft's {config_cls.__name__}{did_you_mean(name, fields)}"
    adapter = _type_check(config_cls, name)
    if adapter is None:
        return None
    from pydantic import ValidationError

    try:
        adapter.validate_python(value)
    except ValidationError as exc:
        allowed = _hint_name(typing.get_type_hints(config_cls).get(name))
        errors = exc.errors()
        what = errors[0]["msg"] if len(errors) == 1 else "not a value it takes"  # a union fails once per member
        return f"{what} (got {value!r}; peft's {config_cls.__name__} takes {allowed})"
    return None


def _validated(config_cls, name: str, value: Any) -> Any:
    """``value`` as its annotated type gives it (``16.0`` for ``r: int`` is ``16``) when that is plain data."""
    adapter = _type_check(config_cls, name)
    if adapter is None or name in SET_FOR_YOU:
        return value
    checked = adapter.validate_python(value)
    plain = (bool, int, float, str, list, dict, type(None))
    return checked if isinstance(checked, plain) else value


@functools.lru_cache(maxsize=None)
def _type_check(config_cls, name: str):
    """A pydantic TypeAdapter for the field's annotated type, or None where it cannot be built."""
    from pydantic import TypeAdapter

    try:
        hint = typing.get_type_hints(config_cls).get(name)
        return None if hint is None else TypeAdapter(_checkable(hint))
    except Exception:  # an annotation pydantic cannot build a check for: peft's own check is all there is
        return None


def _checkable(hint: Any) -> Any:
    """``hint`` with peft's placeholder literals (``'pissa_niter_[number of iters]'``) turned into the
    patterns they stand for (``pissa_niter_16``)."""
    from pydantic import StringConstraints

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        plain = [a for a in args if not (isinstance(a, str) and "[" in a)]
        patterns = [re.escape(a[: a.index("[")]) + r"\d+" for a in args if isinstance(a, str) and "[" in a]
        members = ([Literal[tuple(plain)]] if plain else []) + [
            typing.Annotated[str, StringConstraints(pattern=f"^{p}$")] for p in patterns
        ]
        return Union[tuple(members)] if len(members) > 1 else members[0]
    if origin in (Union, types.UnionType):
        return Union[tuple(_checkable(a) for a in args)]
    return hint


def _hint_name(hint: Any) -> str:
    """An annotation as it reads in code: ``int``, ``Union[bool, Literal['gaussian', ...]]``."""
    if isinstance(hint, type):
        return hint.__name__
    return re.sub(r"<class '(\w+)'>", r"\1", str(hint)).replace("typing.", "").replace("NoneType", "None")


def _for_peft(fields: dict[str, Any], task_type: str = "CAUSAL_LM") -> dict[str, Any]:
    return {**{k: v for k, v in fields.items() if k not in SET_FOR_YOU}, "task_type": task_type}


# --- the policy's adapter ------------------------------------------------------------------------


def fresh_config(model_config, task_type: str = "CAUSAL_LM"):
    """peft's config for a fresh adapter from ``model.lora`` or ``model.peft``; None when neither is set.
    ``task_type`` is ``SEQ_CLS`` for a reward model: peft then also trains its score head (``modules_to_save``)."""
    if model_config.lora is not None:
        from peft import LoraConfig

        lora = model_config.lora
        return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, task_type=task_type)
    if model_config.peft is not None:
        _, config_cls, _ = _config_class(model_config.peft["type"])
        return config_cls(**_for_peft({k: v for k, v in model_config.peft.items() if k != "type"}, task_type))
    return None


def add_adapter(model: nn.Module, model_config, *, task_type: str = "CAUSAL_LM") -> nn.Module:
    """``model`` wrapped with the recipe's adapter (only the adapter trains), or ``model`` itself when the
    recipe sets none of ``model.lora``, ``model.peft`` and ``model.adapter``. ``task_type``: peft's, ``SEQ_CLS``
    for a reward model (a fresh adapter then trains the score head whole beside it)."""
    if model_config.adapter is not None:
        return load_adapter(model, model_config.adapter)
    config = fresh_config(model_config, task_type)
    if config is None:
        return model
    from peft import get_peft_model

    key = "model.lora" if model_config.lora is not None else "model.peft"
    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as exc:  # e.g. a rank peft rejects, no module matched
        raise PrefoptError(f"{key}: peft cannot add this adapter to {model_config.path} ({_first_line(exc)})") from None


def load_adapter(model: nn.Module, path: str, key: str = "model.adapter") -> nn.Module:
    """The adapter saved in folder ``path`` put on ``model``, trainable from where it stands."""
    from peft import PeftConfig, PeftModel

    folder = os.path.expanduser(path)
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        what = "no such folder" if not os.path.isdir(folder) else "the folder has no adapter_config.json"
        raise PrefoptError(f"{key} {path!r}: {what}; give a PEFT adapter folder (save_pretrained of a PeftModel, "
                           "or a prefopt run's model/ saved with output.merge_lora=false)")
    kind = str(getattr(PeftConfig.from_pretrained(folder).peft_type, "value", "")).upper()
    _, _, problem = _config_class(kind)
    if problem is not None:
        raise PrefoptError(f"{key} {path!r}: {problem}")
    try:
        return PeftModel.from_pretrained(model, folder, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes or module names of another base model
        raise PrefoptError(f"{key} {path!r} does not fit model.path ({_first_line(exc)}); give the adapter "
                           "trained on this base model") from None


def reference_is_base(model_config) -> bool:
    """Whether the policy's adapter starts as the identity, so the base model (adapter off) equals the
    initial policy; else the initial policy, adapter included, is the reference (see the module's doc)."""
    if model_config.adapter is not None:
        return False
    if model_config.lora is not None:
        return True
    if model_config.peft is None:
        return False
    field, identity = IDENTITY_INITS.get(model_config.peft["type"], (None, ()))
    if field is None:
        return False
    start = getattr(fresh_config(model_config), field)
    return any(start is value if isinstance(value, bool) else start == value for value in identity)


# --- fingerprints --------------------------------------------------------------------------------


def adapter_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict name prefixes of every adapter tensor of a PEFT model (of any tuner type)."""
    if not is_peft(model):
        return ()
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefixes = []
    for module_name, module in model.get_base_model().named_modules():
        if isinstance(module, BaseTunerLayer):
            prefixes += [f"{module_name}.{attr}." for attr in module.adapter_layer_names]
    return tuple(prefixes)


def base_weights_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the base weights, the reference of an adapter that starts as the identity: adapter
    tensors excluded (a plain LoRA run's key is the same as before adapters of other types were known)."""
    inner = model.get_base_model() if is_peft(model) else model
    skip = adapter_prefixes(model)
    return fingerprint_tensors(
        (name.replace(".base_layer", ""), p) for name, p in inner.state_dict().items()
        if "lora_" not in name and not name.startswith(skip)
    )


def initial_weights_fingerprint(model: nn.Module) -> str:
    """Fingerprint of every tensor of the policy as it starts, adapter included: the reference of an
    adapter that does not start as the identity (another adapter gives another reference, and key)."""
    return fingerprint_tensors(model.state_dict().items())


# --- merged weights ------------------------------------------------------------------------------


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``model`` with its active adapters merged in, under transformers names, the model
    left as it was. Quantized base weights come back dequantized, in the model's floating dtype.

    Each adapted layer is merged by peft's own ``merge`` on a copy of that layer alone (any tuner type:
    LoRA, DoRA, IA3, LoHa, LoKr, ...), so at most one layer's weights are copied at a time. A layer over
    quantized weights is merged as peft merges it (dequantized weight plus the adapter's delta, through
    the DoRA variant where there is one) without quantizing the sum again. Merging in place and unmerging
    afterwards would drift the base weights by rounding; this does not.
    """
    if not is_peft(model):
        return dict(model.state_dict())
    inner = model.get_base_model()
    merged = _base_tensors(model, inner)
    dtype = inner.get_input_embeddings().weight.dtype
    for name, module in inner.named_modules():
        if quantized_layer(module):
            merged[f"{name.replace('.base_layer', '')}.weight"] = _dequantized(module).to(dtype)
    kind = _peft_type(model)
    with torch.no_grad():
        for name, module in _adapted_layers(inner):
            for key, tensor in _merged_layer(name, module, kind).items():
                merged[f"{name}.{key}"] = tensor.to(merged[f"{name}.{key}"].dtype)
    return merged


def _base_tensors(model: nn.Module, inner: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors under transformers names: adapter tensors, quantization state and the
    copies a ``modules_to_save`` wrapper does not use left out."""
    from peft.utils import ModulesToSaveWrapper

    sources: dict[str, str] = {}  # module name -> where its weights are, for modules_to_save copies
    quantized: list[str] = []
    for module_name, module in inner.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            active = [a for a in module.active_adapters if a in module.modules_to_save]
            keep = f".modules_to_save.{active[0]}." if active and not module.disable_adapters else ".original_module."
            sources[module_name] = keep
        if quantized_layer(module):
            quantized.append(module_name + ".")
    skip = adapter_prefixes(model)
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in inner.state_dict().items():
        if "lora_" in name or name.startswith(skip):
            continue
        if name.startswith(tuple(quantized)) and not name.endswith((".weight", ".bias")):
            continue  # bitsandbytes' quantization state (absmax, SCB, ...): the weight is dequantized below
        wrapper = next((m for m in sources if name.startswith(m + ".")), None)
        if wrapper is not None:
            rest = name[len(wrapper):]
            if not rest.startswith(sources[wrapper]):
                continue
            name = wrapper + "." + rest[len(sources[wrapper]):]
        merged[name.replace(".base_layer.", ".")] = tensor
    return merged


def _adapted_layers(inner: nn.Module):
    """(name, layer) of every tuner layer with an active adapter that is not merged into it already."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in inner.named_modules():
        if not isinstance(module, BaseTunerLayer) or module.disable_adapters:
            continue
        if any(a not in module.merged_adapters for a in _active(module)):
            yield name, module


def _active(layer) -> list[str]:
    """The layer's active adapters that it holds weights of."""
    held = set()
    for attr in layer.adapter_layer_names:
        held |= set(getattr(layer, attr, {}).keys())
    return [a for a in layer.active_adapters if a in held]


def _peft_type(model: nn.Module) -> str:
    """The adapter's peft type as peft spells it (LORA, IA3, ...), for messages."""
    config = next(iter(model.peft_config.values()))
    return str(getattr(config.peft_type, "value", config.peft_type))


def _merged_layer(name: str, layer: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The base layer's tensors (``weight``, ``bias``) with the layer's active adapters merged in."""
    adapters = [a for a in _active(layer) if a not in layer.merged_adapters]
    if quantized_layer(layer.get_base_layer()):
        return {"weight": _merged_quantized(name, layer, adapters, kind)}
    twin = copy.deepcopy(layer)  # one layer's weights; peft's merge changes the copy only
    twin.merge(adapter_names=adapters)
    return {key: t.detach() for key, t in twin.get_base_layer().state_dict().items()}


def _merged_quantized(name: str, layer: nn.Module, adapters: list[str], kind: str) -> torch.Tensor:
    """peft's merge of LoRA (and DoRA) over quantized weights, in floating point: the same sum its
    bitsandbytes layers form before they quantize it again."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(layer, LoraLayer):
        raise PrefoptError(f"{name}: merging a {kind} adapter into quantized weights is not "
                           "supported; set output.merge_lora=false (the adapter is saved)")
    weight = _dequantized(layer.get_base_layer()).float()
    for adapter in adapters:
        variant = getattr(layer, "lora_variant", {}).get(adapter)
        if variant is not None:
            weight = variant.merge_safe(layer, adapter, weight)
        else:
            weight = weight + layer.get_delta_weight(adapter).float()
    return weight


def _dequantized(module: nn.Module) -> torch.Tensor:
    """A bitsandbytes layer's weight as floats (peft's ``dequantize_module_weight`` would re-register the
    module's weight on a CPU, which a layer inside a PEFT model refuses)."""
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(module.weight, state=getattr(module, "state", None)).detach()


def merged_model(model: nn.Module) -> nn.Module:
    """A transformers model with the adapter merged in, for saving; ``model`` may be used up.

    Full-precision base weights are merged in place by peft's ``merge_and_unload`` (training is over, so no
    second copy is needed). Quantized ones would be quantized again by that merge, losing the adapter's
    update to rounding, so the merged weights (``merged_state_dict``, dequantized) go into an unquantized
    model of the same config instead.
    """
    from prefopt.models.quantization import is_quantized

    if not is_quantized(model):
        return model.merge_and_unload()
    from transformers import AutoModelForCausalLM

    inner = model.get_base_model()
    weights = merged_state_dict(model)
    config = copy.deepcopy(inner.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = inner.get_input_embeddings().weight.dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or {})
    if unexpected or [m for m in missing if m not in tied]:
        raise RuntimeError(f"merged weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return plain


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
