"""The launch configs in recipes/accelerate/: every key commented, read by accelerate's own config and
launcher code exactly as `accelerate launch --config_file` reads them (nothing is launched here)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

CONFIGS = Path(__file__).parent.parent / "recipes" / "accelerate"
EXPECTED = {  # file: (distributed_type, num_processes, num_machines)
    "single_process.yaml": ("NO", 1, 1),
    "ddp_cpu.yaml": ("MULTI_GPU", 2, 1),
    "ddp_gpu.yaml": ("MULTI_GPU", 8, 1),
    "fsdp.yaml": ("FSDP", 8, 1),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, 1),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8, 1),
    "multi_node.yaml": ("MULTI_GPU", 16, 2),
}


def _launch_args(path: Path):
    """`accelerate launch --config_file PATH -m prefopt.cli train r.yaml`, parsed and filled from the file."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parsed = launch_command_parser().parse_args(["--config_file", str(path), "-m", "prefopt.cli", "train", "r.yaml"])
    args, defaults, _ = _validate_launch_command(parsed)
    return args, defaults


def test_the_shipped_configs_are_the_expected_ones():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_key_is_commented(name):
    for number, line in enumerate((CONFIGS / name).read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped and not stripped.endswith(":"):
            assert "#" in stripped, f"{name}:{number} has no comment: {stripped}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_reads_the_config(name):
    """accelerate's ClusterConfig rejects unknown top-level keys; its launcher turns each fsdp_config and
    deepspeed_config key into a launch option, so every nested key must name one."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(CONFIGS / name)
    distributed_type, processes, machines = EXPECTED[name]
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == (
        distributed_type, processes, machines)
    options = {action.dest for action in launch_command_parser()._actions}
    nested = [k if k.startswith("fsdp_") else f"fsdp_{k}" for k in config.fsdp_config] + list(config.deepspeed_config)
    assert not [key for key in nested if key not in options]
    args, _ = _launch_args(CONFIGS / name)
    assert args.num_processes == processes


def test_ddp_cpu_takes_the_torchrun_launcher():
    """accelerate's CPU path (--cpu / MULTI_CPU) starts one process without MPI; torchrun starts them all."""
    args, _ = _launch_args(CONFIGS / "ddp_cpu.yaml")
    assert args.multi_gpu and not args.cpu and args.num_processes == 2


def test_fsdp_config_builds_accelerates_fsdp_plugin(monkeypatch):
    """The environment the launcher hands each process builds accelerate's FSDP plugin (FSDP2, per-layer wrap)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _ = _launch_args(CONFIGS / "fsdp.yaml")
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy is not None and plugin.cpu_ram_efficient_loading is False


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_config_is_filled_from_the_recipe(name, stage, monkeypatch):
    """accelerate builds its DeepSpeed plugin without the deepspeed package; prefopt then fills in what it
    cannot read from a dataloader (micro-batch size) and the recipe's clipping, and refuses accumulation."""
    from accelerate.utils import DeepSpeedPlugin, DistributedType
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    from prefopt.engine.distributed import configure_deepspeed
    from prefopt.errors import PrefoptError

    args, defaults = _launch_args(CONFIGS / name)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    for key, value in prepare_deepspeed_cmd_env(args)[1].items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage
    gather = plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert gather is (stage == 3)  # ZeRO-3 gathers the whole weights for model/
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=8,
                                  state=SimpleNamespace(deepspeed_plugin=plugin))
    train = SimpleNamespace(batch_size=32, micro_batch_size=4, max_grad_norm=0.5)
    configure_deepspeed(accelerator, train, accumulation=1)
    config = plugin.deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["gradient_clipping"]) == (4, 1, 0.5)
    with pytest.raises(PrefoptError, match=r"set train.micro_batch_size to train.batch_size / processes \(4\)"):
        configure_deepspeed(accelerator, SimpleNamespace(batch_size=32, micro_batch_size=2, max_grad_norm=0.5),
                             accumulation=2)
