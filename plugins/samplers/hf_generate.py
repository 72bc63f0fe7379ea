"""Sampling with transformers ``generate`` on the policy itself: no second copy of the weights.

The sampler keeps a reference to the model ``load_weights`` hands it, so it always samples from the
weights as they are at the moment ``sample`` is called (a PEFT model samples with its adapter applied).
The model is put in eval mode while sampling (no dropout) and back in train mode afterwards if it was.

Sequences (each prompt repeated ``n`` times, in order) are cut into batches of ``batch_size``, left-padded
and sampled with ``do_sample=True`` under the sampler's own temperature, top-p and top-k; the model's
generation config is not applied (no repetition penalty or length rules from the checkpoint), except for
its EOS ids, which end a completion as the tokenizer's EOS does. Each batch draws from the global torch
generator seeded from (seed, batch index) inside ``torch.random.fork_rng``, so the samples depend only on
the weights, prompts, ``n``, seed and ``batch_size`` (not on the caller's random state), and sampling
leaves the caller's random state as it found it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from prefopt import Sample, Sampler, SamplerConfig, derive_seed, eos_token_ids, hookimpl, pad_token_ids
from prefopt.errors import PrefoptError


class TransformersSamplerConfig(SamplerConfig):
    batch_size: int = Field(
        64, ge=1, le=4096, description="Sequences per generate call (prompts x samples). The samples depend on "
        "it: each batch draws its own seeded random stream.",
    )


class TransformersSampler(Sampler):
    """transformers generate on the policy itself: no second copy of the weights; works for every model and LoRA."""

    name = "transformers"
    Config = TransformersSamplerConfig
    config: TransformersSamplerConfig

    def __init__(self, config, context) -> None:
        super().__init__(config, context)
        self.model = None

    def load_weights(self, model) -> None:
        self.model = model  # a reference: sampling sees the weights as they are when sample() runs

    def sample(self, prompts: Sequence[Sequence[int]], n: int, seed: int) -> list[list[Sample]]:
        if self.model is None:
            raise PrefoptError("sampler transformers: call load_weights(model) before sample()")
        if n < 1:
            raise PrefoptError(f"sampler transformers: n must be at least 1, got {n}")
        model, tokenizer = self.model, self.context.tokenizer
        sequences = [list(prompt) for prompt in prompts for _ in range(n)]
        if any(not ids for ids in sequences):
            raise PrefoptError("sampler transformers: a prompt has no tokens")
        eos_ids = eos_token_ids(model, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        generation_config = self._generation_config(eos_ids, pad_id)
        device = next(model.parameters()).device
        size = self.config.batch_size
        was_training = model.training
        model.eval()
        samples: list[Sample] = []
        try:
            for index, start in enumerate(range(0, len(sequences), size)):
                batch = sequences[start : start + size]
                input_ids, attention_mask = pad_token_ids(batch, pad_id, side="left", device=device)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
                    # "prefopt-sampler" keeps these streams apart from the other uses of derive_seed
                    torch.manual_seed(derive_seed("prefopt-sampler", seed, index))
                    output = model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config
                    )
                new_tokens = output[:, input_ids.shape[1] :].tolist()
                samples.extend(to_sample(tokenizer, tokens, eos_ids) for tokens in new_tokens)
        finally:
            model.train(was_training)
        return [samples[i : i + n] for i in range(0, len(samples), n)]

    def close(self) -> None:
        self.model = None

    def _generation_config(self, eos_ids: list[int], pad_id: int):
        from transformers import GenerationConfig

        cfg = self.config
        return GenerationConfig(
            do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            max_new_tokens=cfg.max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True,
        )  # fmt: skip


def to_sample(tokenizer, tokens: Sequence[int], eos_ids: Sequence[int]) -> Sample:
    """A completion cut after its first EOS (kept: it was sampled), or left whole if it has none."""
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    kept = list(tokens) if end is None else list(tokens[: end + 1])
    text = tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return Sample(tuple(kept), text, end is not None)


@hookimpl
def prefopt_register_samplers():
    return [TransformersSampler]
