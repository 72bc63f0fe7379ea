"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step-<N>`` holding
- ``trainable.safetensors``: the parameters that train (the LoRA adapter, or the whole model);
- ``optimizer.pt``: the optimizer state (tensors and numbers only: loaded with ``weights_only=True``);
- ``rng.safetensors``: the CPU (and CUDA) random-generator states, so dropout continues identically;
- ``state.json``: the step, the loss plugin's running state and the trainer's counters;
- ``reference.safetensors``: a following reference's weights (``reference.sync``), when the run has one;
- ``recipe.yaml``: the recipe the run trained under up to here, so a resume can refuse another recipe;
- ``.prefopt``: the marker that says prefopt wrote the folder (rotation deletes only marked folders);
- ``MANIFEST.json``: every file's sha256 and size, written last (``prefopt.integrity``).
It is written under a temporary name and renamed into place, so a crash (even SIGKILL) leaves either
the previous checkpoints or a complete new one; a temporary folder left by a killed writer is removed when
the run starts again (``prefopt.locks.claim_run_dir``). Damage after the write (a truncated copy, a flipped
bit) is found by the manifest when the run resumes: the damaged checkpoint is reported and the previous
intact one is resumed. Data order needs no saving: it is a function of the seed and the epoch.

Under DDP every process holds the same weights and optimizer state, so the main process writes them
and the checkpoint resumes on any number of processes. Under FSDP and DeepSpeed each process holds its
part, so every process writes it through ``accelerator.save_state`` (in accelerate's layout, beside
``state.json``) and ``accelerator.load_state`` reads it back; whether that resumes on another number of
processes is accelerate's rule (FSDP's ``fsdp_state_dict_type``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prefopt.disk import writing
from prefopt.engine.markers import is_marked, write_marker
from prefopt.errors import PrefoptError
from prefopt.integrity import MANIFEST_NAME, verify_manifest, write_manifest
from prefopt.paths import replace_dir

_STEP_DIR = re.compile(r"^step-(\d+)$")
NO_MANIFEST = f"no {MANIFEST_NAME}"


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    loss_state: dict[str, Any]
    extra: dict[str, Any]
    # Named sets of tensors that are neither model nor optimizer (a following reference's weights), each
    # written as <name>.safetensors by the main process.
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    recipe: str = ""  # the run's recipe as YAML, saved beside the state it produced
    # What a resumed run goes on counting: the non-finite guard's counts (``skipped_steps``, ``nonfinite_in_a_row``),
    # the tokens trained on (``num_tokens``) and early stopping's state (``early_stopping``, a mapping).
    counters: dict[str, Any] = field(default_factory=dict)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """A run's checkpoint folders (each was complete when it was renamed into place), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path, say: Callable[[str], None] = lambda message: None) -> Path | None:
    """The newest checkpoint whose files match its manifest, or None when the run has none.

    A damaged one (a file truncated, changed or missing since it was written) is reported through ``say`` and
    the one before it is tried; when every checkpoint is damaged, a one-line error lists them. A checkpoint
    without a manifest was written by a prefopt older than manifests: it is resumed unverified, with a note,
    rather than refused, so a run started before an upgrade still resumes (the atomic rename already
    guaranteed it was complete when written; only later damage goes unseen).
    """
    damaged = []
    for _, path in reversed(checkpoints(run_dir)):
        problems = verify_manifest(path)
        if problems == [NO_MANIFEST] and (path / "state.json").is_file():
            say(f"checkpoint {path} has no {MANIFEST_NAME} (written by an older prefopt): resuming it unverified")
            return path
        if not problems:
            return path
        damaged.append(f"{path.name}: {', '.join(problems)}")
        say(f"checkpoint {path} is damaged ({', '.join(problems)}); trying the one before it")
    if damaged:
        raise PrefoptError(
            f"no intact checkpoint in {run_dir / 'checkpoints'} ({'; '.join(damaged)}); restore the folder from a "
            "copy, or move it aside to train from the start"
        )
    return None


def check_intact(path: Path) -> None:
    """Refuse a named checkpoint (``--resume-from``) that is not a checkpoint or does not match its manifest."""
    if not (path / "state.json").is_file():
        raise PrefoptError(f"--resume-from {path}: not a checkpoint folder (no state.json); name a "
                           "<output.dir>/checkpoints/step-N folder")
    problems = verify_manifest(path)
    if problems and problems != [NO_MANIFEST]:
        raise PrefoptError(f"--resume-from {path}: the checkpoint is damaged ({', '.join(problems)}); name an "
                           "intact one, e.g. the one before it")


def save_checkpoint(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState, keep: int
) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:07d}"
    tmp = root / f".step-{state.step:07d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with _written_whole(tmp, final):
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        _save_tensors(tmp, state)
        _finish_folder(tmp, state)
    replace_dir(tmp, final)  # a re-run of the same step replaces it whole
    rotate(run_dir, state.step, keep)
    return final


def _finish_folder(tmp: Path, state: TrainerState) -> None:
    """The state, the recipe and the marker, then the manifest over every file: last, as it marks the folder
    complete."""
    meta = {"step": state.step, "loss_state": state.loss_state, "extra": state.extra, "counters": state.counters}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if state.recipe:
        (tmp / "recipe.yaml").write_text(state.recipe)
    write_marker(tmp, "checkpoint")
    write_manifest(tmp)


@contextlib.contextmanager
def _written_whole(tmp: Path, final: Path) -> Iterator[None]:
    """Remove ``tmp`` when writing it fails, so no half-written folder stays behind (the earlier checkpoints
    are untouched); a full disk or a refused write is a one-line error naming the checkpoint. A writer killed
    outright leaves ``tmp`` for the next run's start to remove (``prefopt.locks.claim_run_dir``)."""
    try:
        with writing(final, "checkpoint", elsewhere="output.dir"):
            yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rotate(run_dir: Path, newest: int, keep: int) -> None:
    """Delete checkpoints older than step ``newest`` but the ``keep - 1`` newest of them. Only folders prefopt
    marked are counted or deleted; a newer folder (a damaged one the run fell back from) is left for the run
    to replace when it gets there, so the checkpoint just written is never the one deleted."""
    older = [path for step, path in checkpoints(run_dir) if step < newest and is_marked(path, "checkpoint")]
    for path in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)


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
    return _read_state(path)


def _read_state(path: Path) -> TrainerState:
    meta = json.loads((path / "state.json").read_text())
    return TrainerState(meta["step"], meta.get("loss_state", {}), meta.get("extra", {}),
                        counters=meta.get("counters", {}))


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
        with _written_whole(tmp, final):
            _save_tensors(tmp, state)
            _finish_folder(tmp, state)  # the manifest covers every process's files, written before the barrier
        replace_dir(tmp, final)
        rotate(run_dir, state.step, keep)
    accelerator.wait_for_everyone()
    return final


def load_accelerate_checkpoint(path: Path, accelerator) -> TrainerState:
    if (path / "trainable.safetensors").exists():
        raise PrefoptError(
            f"checkpoint {path} was written without FSDP or DeepSpeed and cannot resume under them; "
            "resume it with the launch config it was written with, or use a new output.dir"
        )
    accelerator.load_state(str(path))
    return _read_state(path)


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
