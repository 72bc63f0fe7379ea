"""The cache key of a build: a hash of everything that decides the files' bytes.

Built data is found again under ``<task cache>/sentiment-<key>``, so the key must change whenever the files
would (the options, the seed, the model's and tokenizer's files, the library versions) and must not change
otherwise: existing caches are reused across releases as long as their key is computed the same way.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch

from prefopt_plugins.tasks.sentiment.corpus import SDIST_SHA256

# Bump when the way files are built changes, so caches built by older code are not reused.
BUILD_FORMAT = 1
# Labeling options left out of the cache identity at these defaults, so caches built before they existed
# stay valid.
LABELING_DEFAULTS = {"pairs": "best_worst", "length_bias": 0.0, "random_cut": False}
# Model files whose bytes decide what the model generates (not optimizer states or logs).
_MODEL_FILE_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.json", "*.jinja", "*.model", "*.txt")


def data_key(name: str, config, seed: int, eval_seed: int, model_id: str, tokenizer) -> str:
    """``<name>-<16 hex digits>`` for the data ``config`` (the task's ``SentimentConfig``) builds with these
    seeds, model and tokenizer."""
    import transformers  # imported here, not at plugin load, so `prefopt list` stays fast

    identity = {
        "task": name,
        "format": BUILD_FORMAT,
        "corpus": SDIST_SHA256,
        "config": config.model_dump(mode="json", exclude={"eval_seed", "edit_words", *LABELING_DEFAULTS}),
        "seed": seed,
        "model": model_identity(model_id),
        "tokenizer": tokenizer_identity(tokenizer),
        # Sampled tokens can change with the kernels and the generation code.
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if eval_seed != seed:  # only then are the files different; equal seeds keep earlier caches valid
        identity["eval_seed"] = eval_seed
    labeling = {key: getattr(config, key) for key, default in LABELING_DEFAULTS.items()
                if getattr(config, key) != default}  # fmt: skip
    if config.pairs == "small_edits":
        labeling["edit_words"] = config.edit_words
    if labeling:  # likewise: at the defaults, caches built before these options existed stay valid
        identity["labeling"] = labeling
    return f"{name}-{sha256_json(identity)[:16]}"


def model_identity(model_id: str) -> str:
    """Hash of the files that decide the model's outputs; a hub id (not a directory) stands for itself."""
    directory = Path(model_id)
    if not directory.is_dir():
        return model_id
    files = sorted({p for pattern in _MODEL_FILE_PATTERNS for p in directory.glob(pattern) if p.is_file()})
    return sha256_json([[p.name, _file_sha256(str(p), *_stat_key(p))] for p in files])


def tokenizer_identity(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(map(str, tokenizer.all_special_tokens))
    return sha256_json([type(tokenizer).__name__, vocab, special])


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _stat_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # Memoized on (path, size, mtime): hashing 0.5 GB of weights takes ~0.4 s, once per process.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
