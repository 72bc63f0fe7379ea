"""Test a plugin without a hub or a download: a tiny model, a small real tokenizer, preference pairs, a recipe.

A plugin author's test trains a loss for a few steps on a 2-layer random-init Llama, in about a second on
a CPU, and checks what it logged::

    from prefopt.testing import train_loss

    def test_hinge_trains(tmp_path):
        steps = train_loss("hinge", tmp_path, {"beta": 0.2}, steps=2)
        assert [m["step"] for m in steps] == [1, 2]
        assert all(math.isfinite(m["loss"]) for m in steps)

The pieces are public too, for tests that need more than a loss by name:

- ``tiny_tokenizer()``: a byte-level BPE trained in memory on the sample pairs (any text encodes, and decodes
  back to itself), with a ChatML chat template so conversational data works;
- ``tiny_model(path)``: that tokenizer and a 2-layer random-init Llama saved to ``path`` (a ``model.path``);
- ``preference_file(path)``: the sample pairs (``PAIRS``) as a standard-format JSON-lines file;
- ``tiny_recipe(workdir)``: a recipe tree wired to all three, ``write_recipe`` to save it as YAML for the CLI;
- ``pair_logps(...)``: a ``PairLogps`` from plain lists, for a loss's hand-worked values.

A plugin that is not installed is reached through ``plugins=load_plugins(extra=["my_module"])``. The
reference log-probs are cached under ``<workdir>/cache`` unless ``PREFOPT_CACHE`` names a cache already.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from prefopt.api.loss import PairLogps
from prefopt.paths import CACHE_ENV

__all__ = [
    "PAIRS", "pair_logps", "preference_file", "tiny_model", "tiny_recipe", "tiny_tokenizer", "train_loss",
    "write_recipe",
]

# Plain-English preference pairs (prompt, chosen, rejected): three batches of four.
PAIRS: tuple[tuple[str, str, str], ...] = (
    ("The movie was", " a joy from start to finish.", " a dull and tedious mess."),
    ("The acting in this film", " is warm and wonderful.", " is wooden and lifeless."),
    ("I left the theater feeling", " happy and inspired.", " bored and annoyed."),
    ("The soundtrack", " is lovely and moving.", " is grating and loud."),
    ("Overall, the story", " is charming and clever.", " is confusing and flat."),
    ("The director has made", " a beautiful, heartfelt film.", " an ugly, careless film."),
    ("Critics will say the plot", " is gripping and fresh.", " is stale and predictable."),
    ("The final scene", " left me smiling.", " left me cold."),
    ("Its humor", " is sharp and delightful.", " is crude and tiresome."),
    ("The cast", " shines in every role.", " struggles in every role."),
    ("This sequel", " improves on the original.", " ruins the original."),
    ("The dialogue", " sparkles with wit.", " falls painfully flat."),
)

# ChatML, as SmolLM2 and Qwen write it: the tokens are special, so a conversation tokenizes the same way
# whatever the vocabulary learnt.
PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=4)
def _trained_bpe(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # Every byte is in the alphabet, so no text is ever unknown; the merges come from the sample pairs.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(["".join(pair) for pair in PAIRS] * 4, trainer)
    return bpe.to_str()


def tiny_tokenizer(vocab_size: int = 400):
    """A transformers tokenizer: byte-level BPE with ``vocab_size`` entries at most (256 bytes, 3 special
    tokens, merges learnt from ``PAIRS``), EOS ``<|im_end|>``, pad ``<|endoftext|>``, and a ChatML template.
    Trained in memory in milliseconds (once per process and size); every call returns a fresh copy."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe(vocab_size)), bos_token=BOS, eos_token=EOS,
        pad_token=PAD, chat_template=CHAT_TEMPLATE,
    )


def tiny_model(path: str | Path, *, tokenizer=None, seed: int = 0, **config: Any) -> Path:
    """Save a random-init 2-layer Llama (hidden size 32) and its tokenizer (``tiny_tokenizer()`` by default)
    to ``path``, and return it: a local ``model.path``. ``config`` overrides ``LlamaConfig`` fields; the
    same ``seed`` gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    values = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # seeded here without moving the caller's random stream
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(**{**values, **config})).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def preference_file(path: str | Path, pairs: Sequence[tuple[str, str, str]] = PAIRS) -> Path:
    """Write ``pairs`` (prompt, chosen, rejected) to ``path`` as JSON lines in the standard format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": prompt, "chosen": chosen, "rejected": rejected} for prompt, chosen, rejected in pairs]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def tiny_recipe(workdir: str | Path, *, loss: str = "dpo", steps: int = 2, **sections: Any) -> dict:
    """A recipe tree (not yet validated) that trains ``loss`` for ``steps`` optimizer steps of 4 pairs on the
    tiny model and the sample pairs, building both under ``workdir`` unless they are there already; the run
    writes to ``<workdir>/run``. ``sections`` are merged one level deep (``train={"batch_size": 2}``) or
    replace a section (``loss={"name": "ipo", "tau": 0.5}``)."""
    workdir = Path(workdir)
    model_dir = workdir / "tiny-model"
    if not (model_dir / "config.json").is_file():
        tiny_model(model_dir)
    data = workdir / "pairs.jsonl"
    if not data.is_file():
        preference_file(data)
    tree: dict[str, Any] = {
        "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"path": str(data), "max_length": 48, "max_prompt_length": 24},
        "loss": {"name": loss},
        "train": {"batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3, "lr_scheduler": "constant",
                  "max_steps": steps},
        "eval": {"at_start": False, "task_metrics": False},
        "output": {"dir": str(workdir / "run"), "trackers": [], "save_model": False},
    }
    for key, value in sections.items():
        merge = isinstance(value, dict) and isinstance(tree.get(key), dict)
        tree[key] = {**tree[key], **copy.deepcopy(value)} if merge else copy.deepcopy(value)
    return tree


def write_recipe(tree: dict, path: str | Path) -> Path:
    """Save a recipe tree as YAML (for ``prefopt train`` or ``prefopt validate`` in a subprocess)."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def train_loss(name: str, workdir: str | Path, options: dict | None = None, *, steps: int = 2, plugins=None,
               **sections: Any) -> list[dict]:
    """Train the tiny model with loss ``name`` (``options`` are its recipe options) for ``steps`` optimizer
    steps in this process, and return the metrics logged at each step, in order (``metrics.jsonl``'s training
    lines: ``step``, ``loss``, ``rewards/accuracies``, ``loss/<key>`` for the loss's own metrics, ...).

    The recipe is ``tiny_recipe(workdir, ...)`` with ``sections`` merged in, validated like a recipe file, so
    a bad option raises the same ``RecipeError`` as ``prefopt validate``. ``plugins`` defaults to the
    installed plugins. A rerun in the same ``workdir`` resumes from its checkpoints (``output.resume``);
    give each test its own directory.
    """
    from prefopt.engine import run as run_recipe
    from prefopt.recipe import validate_tree
    from prefopt.registry.loading import default_plugins

    plugins = plugins or default_plugins()
    tree = tiny_recipe(workdir, steps=steps, **sections)
    tree["loss"] = {"name": name, **(options or {})}
    recipe = validate_tree(tree, plugins, f"train_loss({name!r})")
    with _cache_under(Path(workdir) / "cache"):
        run_recipe(recipe, plugins, show_progress=False)
    lines = (Path(recipe.output.dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [entry for entry in map(json.loads, lines) if "loss" in entry]


@contextlib.contextmanager
def _cache_under(path: Path) -> Iterator[None]:
    """Keep the run's cache (reference log-probs) under ``path``, unless ``PREFOPT_CACHE`` already names one:
    a test never writes to the user's cache."""
    if os.environ.get(CACHE_ENV):
        yield
        return
    os.environ[CACHE_ENV] = str(path)
    try:
        yield
    finally:
        os.environ.pop(CACHE_ENV, None)


def pair_logps(
    policy_chosen: Sequence[float], policy_rejected: Sequence[float], ref_chosen: Sequence[float] | None = None,
    ref_rejected: Sequence[float] | None = None, *, chosen_tokens: Sequence[float] | None = None,
    rejected_tokens: Sequence[float] | None = None, requires_grad: bool = False,
) -> PairLogps:
    """A ``PairLogps`` of summed log-probs from plain lists (float64, one entry per pair), for testing a loss
    on values worked by hand: ``loss(pair_logps([-1.0], [-2.0], [-1.5], [-1.5]))``. Token counts default to
    1; with ``requires_grad`` the policy tensors are leaves whose gradients a test can read."""

    def tensor(values, grad: bool = False):
        return None if values is None else torch.tensor(values, dtype=torch.float64, requires_grad=grad)

    ones = [1.0] * len(policy_chosen)
    return PairLogps(
        policy_chosen=tensor(policy_chosen, requires_grad), policy_rejected=tensor(policy_rejected, requires_grad),
        chosen_tokens=tensor(chosen_tokens or ones), rejected_tokens=tensor(rejected_tokens or ones),
        ref_chosen=tensor(ref_chosen), ref_rejected=tensor(ref_rejected),
    )
