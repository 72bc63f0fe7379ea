"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step-<N>`` holding
- ``trainable.safetensors``: the parameters that train (the LoRA adapter, or the whole model);
- ``optimizer.pt``: the optimizer state (tensors and numbers only: loaded with ``weights_only=True``);
- ``rng.safetensors``: the CPU (and CUDA) random-generator states, so dropout continues identically;
- ``state.json``: the step, the loss plugin's running state and the trainer's counters;
- ``reference.safetensors``: a following reference's weights (``reference.sync``), when the run has one.
It is written under a temporary name and renamed into place, so a crash (even SIGKILL) leaves either
the previous checkpoints or a complete new one. Data order needs no saving: it is a function of the
seed and the epoch.

Under DDP every process holds the same weights and optimizer state, so the main process writes them
and the checkpoint resumes on any number of processes. Under FSDP and DeepSpeed each process holds its
part, so every process writes it through ``accelerator.save_state`` (in accelerate's layout, beside
``state.json``) and ``accelerator.load_state`` reads it back; whether that resumes on another number of
processes is accelerate's rule (FSDP's ``fsdp_state_dict_type``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prefopt.errors import PrefoptError

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    loss_state: dict[str, Any]
    extra: dict[str, Any]
    # Named sets of tensors that are neither model nor optimizer (a following reference's weights), each
    # written as <name>.safetensors by the main process.
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState, keep: int
) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:07d}"
    tmp = root / f".step-{state.step:07d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    _save_tensors(tmp, state)
    (tmp / "state.json").write_text(
        json.dumps({"step": state.step, "loss_state": state.loss_state, "extra": state.extra}, indent=1)
    )
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainerState:
    if not (path / "trainable.safetensors").exists() and (path / "state.json").exists():
        raise PrefoptError(
            f"checkpoint {path} was written under FSDP or DeepSpeed; resume it with the launch config it was "
            "written with, or use a new output.dir"
        )
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    unexpected = [name for name in weights if name not in params]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "was the recipe's model or LoRA section changed? Use a new output.dir or output.resume=never"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    meta = json.loads((path / "state.json").read_text())
    return TrainerState(meta["step"], meta.get("loss_state", {}), meta.get("extra", {}))


def save_accelerate_checkpoint(run_dir: Path, accelerator, state: TrainerState, keep: int) -> Path:
    """Like ``save_checkpoint``, for state held by FSDP or DeepSpeed: every process calls it."""
    root = run_dir / "checkpoints"
    final = root / f"step-{state.step:07d}"
    tmp = root / f".step-{state.step:07d}.tmp"  # one name for every process: they all write into it
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model, optimizer and each process's random-generator states
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(
            json.dumps({"step": state.step, "loss_state": state.loss_state, "extra": state.extra}, indent=1)
        )
        _save_tensors(tmp, state)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_accelerate_checkpoint(path: Path, accelerator) -> TrainerState:
    if (path / "trainable.safetensors").exists():
        raise PrefoptError(
            f"checkpoint {path} was written without FSDP or DeepSpeed and cannot resume under them; "
            "resume it with the launch config it was written with, or use a new output.dir"
        )
    accelerator.load_state(str(path))
    meta = json.loads((path / "state.json").read_text())
    return TrainerState(meta["step"], meta.get("loss_state", {}), meta.get("extra", {}))


def _save_tensors(directory: Path, state: TrainerState) -> None:
    for name, tensors in state.tensors.items():
        save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(directory / f"{name}.safetensors"))


def load_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    """A named tensor set of checkpoint ``path`` (see ``TrainerState.tensors``)."""
    file = path / f"{name}.safetensors"
    if not file.exists():
        raise PrefoptError(f"checkpoint {path} has no {file.name}; it was written by a run without this state "
                           "(was reference.sync added?); use a new output.dir")
    return load_file(str(file))


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
