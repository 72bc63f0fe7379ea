"""The sampler contract: a plugin that generates completions of prompts from a model's current weights.

Online algorithms sample from the policy while it trains (online and iterative DPO) or from a copy of it
(SAPO's EMA model). They call ``load_weights(model)`` whenever the weights to sample from have changed,
then ``sample``. A sampler may keep its own copy of the weights (a vLLM engine) or generate with the
model it is given (``generate`` in transformers); either way it samples from exactly those weights.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from typing import ClassVar, Sequence

from pydantic import Field

from prefopt.api.plugin import Plugin, PluginConfig
from prefopt.errors import PrefoptError

__all__ = ["Sample", "Sampler", "SamplerConfig", "SamplerContext", "derive_seed", "eos_token_ids"]


class SamplerConfig(PluginConfig):
    """Options every sampler has (recipe key ``algorithm.sampler``); samplers add their own. Unknown keys are
    errors."""

    max_new_tokens: int = Field(64, ge=1, le=32768, description="Length limit of each completion, in tokens.")
    temperature: float = Field(1.0, gt=0, le=5, description="Sampling temperature; 1.0 samples the model as it is.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with "
                         "this much probability; 1.0 keeps all.")
    top_k: int = Field(0, ge=0, description="Keep only the k likeliest tokens; 0 keeps all.")


@dataclass(frozen=True)
class SamplerContext:
    """What an online algorithm hands a sampler when it builds it."""

    model_path: str  # local directory of the policy's initial weights (config, weights, tokenizer)
    tokenizer: object  # the policy's transformers tokenizer
    dtype: str  # "float32", "bfloat16" or "float16", as recipe key model.dtype
    trust_remote_code: bool = False
    device: str = "cpu"
    seed: int = 0


@dataclass(frozen=True)
class Sample:
    """One sampled completion."""

    token_ids: tuple[int, ...]  # the sampled tokens, the EOS that ended them included
    text: str  # the completion decoded without special tokens
    finished: bool  # whether it ended with EOS (False: cut at max_new_tokens)


class Sampler(Plugin):
    """Base class of sampler plugins. Subclasses set ``name`` (recipe key ``algorithm.sampler.name``),
    ``Config`` (a ``SamplerConfig`` subclass) and a docstring whose first line ``prefopt list`` shows."""

    Config: ClassVar[type[SamplerConfig]] = SamplerConfig

    def __init__(self, config: SamplerConfig, context: SamplerContext) -> None:
        self.config = config
        self.context = context

    @abc.abstractmethod
    def load_weights(self, model) -> None:
        """Sample from ``model``'s current weights from now on. ``model`` is a transformers causal LM (a PEFT
        model under LoRA, whose adapter counts as merged), unwrapped from any distributed wrapper."""

    @abc.abstractmethod
    def sample(self, prompts: Sequence[Sequence[int]], n: int, seed: int) -> list[list[Sample]]:
        """``n`` completions of each prompt (token ids, special tokens included as the chat template put
        them). The same weights, prompts, ``n`` and ``seed`` give the same samples, so a resumed run samples
        what the interrupted one did."""

    def close(self) -> None:
        """Free what the sampler holds (an engine, its KV cache)."""


def derive_seed(*parts: object) -> int:
    """A 63-bit seed of its own for each tuple of parts (a run's seed, a purpose, a batch or prompt index):
    a hash rather than ``seed + index``, so neighbouring batches draw unrelated random streams and two
    purposes never share one."""
    key = ":".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS, then the EOS ids of the model's generation
    config (``model`` may be None), without repeats.

    Both, not either: the tokenizer's EOS is the one prefopt ends every training response with
    (``data.append_eos``), so a policy trained here learns to stop with it, while the generation config lists
    where the checkpoint was trained to stop (a chat model's end-of-turn token, sometimes several). Stopping
    on only one set lets a completion run on past an end the model chose. The tokenizer's comes first, so
    ``[0]`` is the id to pad with when the tokenizer has no pad token.
    """
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise PrefoptError("sampler: neither the tokenizer nor the model's generation config names an EOS token")
    return ids
