"""What the engine checks and configures for distributed runs (DDP over gloo on CPU, FSDP, DeepSpeed)."""

from __future__ import annotations

import importlib.util
import os

import torch

from prefopt.errors import PrefoptError


def cpu_processes() -> bool:
    """Whether this is one of several processes started by a launcher on a machine with no GPU (or FSDP or
    DeepSpeed asked for where they cannot run: a one-line error instead of accelerate's traceback).

    ``accelerate launch --multi_gpu`` (torchrun) starts the processes, but accelerate joins them over gloo
    only when told they are CPU processes; otherwise each would train alone, all into one output.dir.
    """
    import accelerate

    no_device = not torch.accelerator.is_available()
    if _env_flag("ACCELERATE_USE_FSDP") and no_device:
        raise PrefoptError(
            f"FSDP needs GPUs: accelerate {accelerate.__version__} runs FSDP only on CUDA, XPU, NPU, MLU, MUSA or "
            "HPU devices and this machine has none; on CPU launch with "
            "--config_file recipes/accelerate/ddp_cpu.yaml (DDP over gloo) instead"
        )
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and importlib.util.find_spec("deepspeed") is None:
        raise PrefoptError(
            "this run was launched for DeepSpeed but the package 'deepspeed' is not installed: "
            "pip install deepspeed, or launch with another config in recipes/accelerate/"
        )
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and no_device


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def check_distributed(recipe, accelerator) -> None:
    """Refuse what would silently train wrong, before any model is loaded."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise PrefoptError(
            f"launched as {launched} processes but accelerate joined {accelerator.num_processes}: each would train "
            "alone; launch with a config from recipes/accelerate/ (on CPU: ddp_cpu.yaml)"
        )
    if not sharded_params(accelerator):
        return
    if recipe.data.task is not None and recipe.eval.task_metrics:
        raise PrefoptError(
            "eval.task_metrics samples from the model on the main process alone, which FSDP or ZeRO-3 cannot do "
            "(each process holds a shard of the weights); set eval.task_metrics=false"
        )
    if recipe.model.has_adapter and recipe.output.save_model and recipe.output.merge_lora:
        raise PrefoptError(
            "output.merge_lora needs the whole model on one process, which FSDP or ZeRO-3 do not hold; "
            "set output.merge_lora=false (the adapter is saved) or train without sharding"
        )
    if recipe.model.quantization is not None:
        raise PrefoptError(
            "model.quantization is not supported under FSDP or ZeRO-3 (sharding quantized weights needs a storage "
            "dtype prefopt does not set); train with DDP or one process, or remove model.quantization"
        )


def sharded_params(accelerator) -> bool:
    """Whether each process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


def accelerate_owns_state(accelerator) -> bool:
    """Whether model and optimizer state live in FSDP or DeepSpeed, so checkpoints go through accelerate."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def configure_deepspeed(accelerator, train, accumulation: int) -> None:
    """Fill the DeepSpeed config from the recipe (prefopt prepares no dataloader for accelerate to read).

    DeepSpeed steps its optimizer inside ``backward`` and clips there too, so the engine's own accumulation
    and clipping cannot apply: one micro-batch per process per step, and ``gradient_clipping`` from the recipe.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if accumulation != 1:
        raise PrefoptError(
            f"under DeepSpeed each optimizer step must be one micro-batch per process: set train.micro_batch_size "
            f"to train.batch_size / processes ({train.batch_size // accelerator.num_processes})"
        )
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    clip = train.max_grad_norm if train.max_grad_norm is not None else 0.0  # 0: DeepSpeed does not clip
    if config.get("gradient_clipping", "auto") not in ("auto", clip):
        raise PrefoptError(
            f"the DeepSpeed config clips gradients at {config['gradient_clipping']} but train.max_grad_norm is "
            f"{train.max_grad_norm}; set gradient_clipping: auto in the accelerate config"
        )
    if config.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise PrefoptError("set gradient_accumulation_steps: 1 in the accelerate config: prefopt batches steps itself")
    config.update(train_micro_batch_size_per_gpu=train.micro_batch_size, gradient_accumulation_steps=1,
                  gradient_clipping=clip)
