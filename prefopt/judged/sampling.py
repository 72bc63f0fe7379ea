"""A model's completions of prompts, through the sampler contract (``prefopt.api.sampler``), reproducibly.

Evaluation samples with ``ModelSampler``, a ``Sampler`` of its own, rather than the built-in ``transformers``
sampler, because the two draw different random streams from the same seed, and the sentiment task's cached
data (and the numbers published from it) were sampled with this stream:

- the ``transformers`` sampler cuts its sequences into batches of ``batch_size`` and seeds batch i with
  ``derive_seed("prefopt-sampler", seed, i)``; here the *prompts* are cut into batches of
  ``batch_size // per_prompt`` and batch i is seeded with ``derive_seed(seed, purpose, i)``;
- the ``transformers`` sampler stops at the tokenizer's EOS and the generation config's, on a fresh
  generation config; here sampling stops at the model's generation-config EOS ids (the tokenizer's only when
  it names none) and samples on top of the model's generation config.

Given the same seed for the same batch, the two generate the same tokens (for SmolLM2 their EOS ids
coincide). So here the caller batches and seeds (``sample_completions``, ``sample_prompt_ids``), and each
``ModelSampler.sample`` call is one ``generate`` call seeded with the seed it is given. Neither the batching
nor the seeding may change: the same seed must keep giving the same completions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from tqdm.auto import tqdm

from prefopt.api.sampler import Sample, Sampler, SamplerConfig, SamplerContext, derive_seed
from prefopt.forward.batching import pad_token_ids

__all__ = ["Completion", "ModelSampler", "model_eos_ids", "model_sampler", "sample_completions", "sample_prompt_ids"]


@dataclass(frozen=True)
class Completion:
    """One sampled continuation, decoded without special tokens and with its leading space."""

    text: str
    num_tokens: int  # generated tokens before EOS
    prompt_ids: tuple[int, ...] = ()  # the prompt as the model saw it
    token_ids: tuple[int, ...] = ()  # the sampled tokens, the EOS that ended them included
    finished: bool = False  # whether it ended with EOS (else it reached the length limit)


class ModelSampler(Sampler):
    """One transformers ``generate`` call per ``sample()``, on the model it holds, seeded with ``seed``."""

    name = "model"  # never registered: evaluation builds it itself (``model_sampler``)

    def __init__(self, config: SamplerConfig, context: SamplerContext) -> None:
        super().__init__(config, context)
        self.model = None

    def load_weights(self, model) -> None:
        self.model = model  # a reference: sampling sees the weights as they are when sample() runs

    def sample(self, prompts: Sequence[Sequence[int]], n: int, seed: int) -> list[list[Sample]]:
        model, tokenizer, cfg = self.model, self.context.tokenizer, self.config
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos_ids = model_eos_ids(model, tokenizer)
        sequences = [list(ids) for ids in prompts for _ in range(n)]
        # Padded by hand (not by the tokenizer), so the caller's tokenizer keeps its padding side.
        input_ids, attention_mask = pad_token_ids(sequences, pad_id, side="left", device=model.device)
        was_training = model.training
        model.eval()
        try:
            # generate() draws from the global generator; fork it so sampling neither depends on nor disturbs
            # the caller's random state.
            devices = [model.device] if model.device.type == "cuda" else []
            with torch.inference_mode(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                output = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                    repetition_penalty=1.0,  # plain sampling even if the model's generation config says otherwise
                    max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids,
                )  # fmt: skip
        finally:
            model.train(was_training)
        samples = [_to_sample(tokenizer, tokens, eos_ids) for tokens in output[:, input_ids.shape[1] :].tolist()]
        return [samples[i : i + n] for i in range(0, len(samples), n)]

    def close(self) -> None:
        self.model = None


def model_sampler(model, tokenizer, config: SamplerConfig) -> ModelSampler:
    """A ``ModelSampler`` holding ``model``, its context read off the model."""
    context = SamplerContext(
        model_path=str(getattr(model, "name_or_path", "")), tokenizer=tokenizer,
        dtype=str(model.dtype).removeprefix("torch."), device=str(model.device),
    )  # fmt: skip
    sampler = ModelSampler(config, context)
    sampler.load_weights(model)
    return sampler


PromptText = Union[str, object]  # a prompt's text, or an object holding it in ``.text``


def sample_completions(
    sampler: Sampler, tokenizer, prompts: Sequence[PromptText], per_prompt: int, seed: int, purpose: str,
    batch_size: int, show_progress: bool = False, label: str = "sampling",
) -> list[list[Completion]]:  # fmt: skip
    """``per_prompt`` sampled continuations of each prompt (a text, or an object with ``.text``), tokenized
    by ``tokenizer`` as it tokenizes plain text (special tokens added); see ``sample_prompt_ids``."""
    texts = [prompt if isinstance(prompt, str) else prompt.text for prompt in prompts]
    # Each text is tokenized alone (no padding), so tokenizing all at once gives each batch's ids.
    prompt_ids = tokenizer(texts).input_ids if texts else []
    return sample_prompt_ids(sampler, prompt_ids, per_prompt, seed, purpose, batch_size, show_progress, label)


def sample_prompt_ids(
    sampler: Sampler, prompt_ids: Sequence[Sequence[int]], per_prompt: int, seed: int, purpose: str,
    batch_size: int, show_progress: bool = False, label: str = "sampling",
) -> list[list[Completion]]:  # fmt: skip
    """``per_prompt`` sampled continuations of each tokenized prompt, the same for the same seed and batch size.

    Prompts go to ``sampler`` ``batch_size // per_prompt`` at a time (at least one), batch i seeded with
    ``derive_seed(seed, purpose, i)``; cached data and published numbers depend on both, so neither may change."""
    prompts_per_batch = max(1, batch_size // per_prompt)
    results: list[list[Completion]] = []
    bar = tqdm(total=len(prompt_ids) * per_prompt, desc=f"{label} {purpose}", unit="seq", disable=not show_progress)
    with bar:
        for index, start in enumerate(range(0, len(prompt_ids), prompts_per_batch)):
            batch = [list(ids) for ids in prompt_ids[start : start + prompts_per_batch]]
            samples = sampler.sample(batch, per_prompt, seed=derive_seed(seed, purpose, index))
            for ids, group in zip(batch, samples):
                results.append([_completion(sample, ids) for sample in group])
            bar.update(len(batch) * per_prompt)
    return results


def model_eos_ids(model, tokenizer) -> list[int]:
    """The model's generation-config EOS ids, or the tokenizer's EOS when the config names none."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    return list(configured) if isinstance(configured, (list, tuple)) else [configured]


def _to_sample(tokenizer, tokens: list[int], eos_ids: list[int]) -> Sample:
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
    # Keep the leading space and exact spacing: prompt + completion must read as the sampled text.
    text = tokenizer.decode(tokens[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    # What was sampled ends at the EOS (generate pads after it); the EOS itself was a sampled choice.
    finished = end < len(tokens)
    return Sample(tuple(tokens[: end + 1] if finished else tokens), text, finished)


def _completion(sample: Sample, prompt_ids: Sequence[int]) -> Completion:
    num_tokens = len(sample.token_ids) - sample.finished  # the EOS that ended it is not counted
    return Completion(sample.text, num_tokens, tuple(prompt_ids), sample.token_ids, sample.finished)
