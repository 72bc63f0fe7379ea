"""Sampling continuations of the prompts, through the sampler contract (``prefopt.api.sampler``).

The task samples with ``TaskSampler``, a ``Sampler`` of its own, rather than the built-in ``transformers``
sampler, because the two draw different random streams from the same seed and the task's cached data (and
the numbers published from it) were sampled with the task's stream:

- the ``transformers`` sampler cuts its sequences into batches of ``batch_size`` and seeds batch i with
  ``derive_seed("prefopt-sampler", seed, i)``; the task cuts its *prompts* into batches of
  ``batch_size // completions_per_prompt`` and seeds batch i of a split with ``derive_seed(seed, split, i)``;
- the ``transformers`` sampler stops at the tokenizer's EOS and the generation config's, on a fresh
  generation config; the task stops at the model's generation-config EOS ids (the tokenizer's only when it
  names none) and samples on top of the model's generation config.

Given the same seed for the same batch, the two generate the same tokens (for SmolLM2 their EOS ids
coincide). So here the caller batches and seeds (``sample_completions``), and each ``TaskSampler.sample``
call is one ``generate`` call seeded with the seed it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from prefopt import Sample, Sampler, SamplerConfig, SamplerContext, derive_seed, pad_token_ids

from prefopt_plugins.tasks.sentiment.corpus import Prompt


@dataclass(frozen=True)
class Completion:
    """One sampled continuation, decoded without special tokens and with its leading space."""

    text: str
    num_tokens: int  # generated tokens before EOS
    prompt_ids: tuple[int, ...] = ()  # the prompt as the model saw it
    token_ids: tuple[int, ...] = ()  # the sampled tokens, the EOS that ended them included


class TaskSampler(Sampler):
    """The task's sampling: one transformers generate call per sample(), on the model it holds, seeded with ``seed``."""

    name = "sentiment_task"  # never registered: the task builds it itself

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


def task_sampler(model, tokenizer, config: SamplerConfig) -> TaskSampler:
    """A ``TaskSampler`` holding ``model``, its context read off the model."""
    context = SamplerContext(
        model_path=str(getattr(model, "name_or_path", "")), tokenizer=tokenizer,
        dtype=str(model.dtype).removeprefix("torch."), device=str(model.device),
    )  # fmt: skip
    sampler = TaskSampler(config, context)
    sampler.load_weights(model)
    return sampler


def sample_completions(
    sampler: Sampler, tokenizer, prompts: list[Prompt], per_prompt: int, seed: int, purpose: str,
    batch_size: int, show_progress: bool = False,
) -> list[list[Completion]]:  # fmt: skip
    """``per_prompt`` sampled continuations of each prompt, the same for the same seed and batch size.

    Prompts go to ``sampler`` ``batch_size // per_prompt`` at a time (at least one), batch i seeded with
    ``derive_seed(seed, purpose, i)``; the task's cached data depends on both, so neither may change."""
    prompts_per_batch = max(1, batch_size // per_prompt)
    results: list[list[Completion]] = []
    bar = tqdm(total=len(prompts) * per_prompt, desc=f"sentiment {purpose}", unit="seq", disable=not show_progress)
    with bar:
        for index, start in enumerate(range(0, len(prompts), prompts_per_batch)):
            batch = prompts[start : start + prompts_per_batch]
            prompt_ids = tokenizer([p.text for p in batch]).input_ids
            samples = sampler.sample(prompt_ids, per_prompt, seed=derive_seed(seed, purpose, index))
            for ids, group in zip(prompt_ids, samples):
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
    return Completion(sample.text, num_tokens, tuple(prompt_ids), sample.token_ids)
