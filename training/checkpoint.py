"""Atomic checkpoints (written into a temporary folder renamed when complete) and resumption that never unpickles.

A checkpoint folder holds:

- ``model.safetensors``: the weights (safetensors, no code);
- ``optimizer.bin`` (and ``scaler.bin`` under fp16): `torch.save` files read back with ``weights_only=True``
  (tensors, numbers, strings and containers only: a planted pickle that would run code is refused);
- ``scheduler.json``, ``progress.json``: the schedule's state and the run's counters and logged history, as JSON;
- ``random_states_<process>.json``: each process's Python, numpy and torch random states, as JSON.

accelerate's own ``save_state``/``load_state`` are not used: ``load_state`` unpickles the objects registered with
``register_for_checkpointing`` (``custom_checkpoint_*.pkl``) with ``weights_only=False`` (any code in them runs),
and it only logs a damaged random-state file and continues with other random states. Here every file is checked
as it is read, and a damaged or foreign one stops the run with a `CheckpointError` naming the file and the
previous checkpoint to resume from instead.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator

CHECKPOINT_PREFIX = "checkpoint-"
TMP_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
MODEL_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.bin"
SCALER_NAME = "scaler.bin"
SCHEDULER_NAME = "scheduler.json"
PROGRESS_NAME = "progress.json"
RANDOM_STATES_NAME = "random_states_{}.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (damaged, foreign, or from an older version); the message names the
    file and the checkpoint to resume from instead."""


@dataclass
class TrainingProgress:
    """Counters saved with every checkpoint (``progress.json``)."""

    step: int = 0
    stage: int = 1
    max_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {f.name for f in dataclasses.fields(self)}
        if not isinstance(state, Mapping) or set(state) != expected:
            found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"expected the keys {sorted(expected)}; found {found}")
        if not all(isinstance(state[key], int) and not isinstance(state[key], bool)
                   for key in ("step", "stage", "max_steps")) or not isinstance(state["history"], list):
            raise ValueError("step, stage and max_steps must be integers and history a list")
        for key, value in state.items():
            setattr(self, key, copy.deepcopy(value))


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `checkpoint_dir`, oldest first (temporary folders of interrupted saves excluded)."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


# ---------------------------------------------------------------------------------------------- random states
def random_states() -> dict[str, Any]:
    """This process's Python, numpy and torch (CPU and CUDA) random states as JSON-serialisable values."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        states["cuda"] = [state.tolist() for state in torch.cuda.get_rng_state_all()]
    return states


def set_random_states(states: Mapping[str, Any]) -> None:
    """Restore what `random_states` returned (ValueError/TypeError when the values do not fit)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        cuda = [torch.tensor(state, dtype=torch.uint8) for state in states["cuda"]]
        if len(cuda) != torch.cuda.device_count():
            raise ValueError(f"holds the states of {len(cuda)} CUDA devices; this machine has "
                             f"{torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------- saving
def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: str | os.PathLike, step: int, keep: int,
                    model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, progress: TrainingProgress) -> Path:
    """Write a checkpoint (see the module docstring) into a temporary folder, renamed to ``checkpoint-<step>`` once
    every process has written its part, so a checkpoint folder is always complete; keeps the newest `keep`."""
    directory = Path(checkpoint_dir)
    final = directory / checkpoint_name(step)
    temporary = directory / f"{TMP_CHECKPOINT_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        safetensors.torch.save_model(accelerator.unwrap_model(model), str(temporary / MODEL_NAME))
        torch.save(optimizer.state_dict(), temporary / OPTIMIZER_NAME)
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), temporary / SCALER_NAME)
        _write_json(temporary / SCHEDULER_NAME, scheduler.state_dict())
        _write_json(temporary / PROGRESS_NAME, progress.state_dict())
    _write_json(temporary / RANDOM_STATES_NAME.format(accelerator.process_index), random_states())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------- loading
def _previous_checkpoint_hint(checkpoint: Path) -> str:
    earlier = [path for path in list_checkpoints(checkpoint.parent) if path.name < checkpoint.name]
    if earlier:
        return f"resume from the previous checkpoint with --resume {earlier[-1]} (or delete {checkpoint})"
    return f"delete {checkpoint} to start afresh (there is no earlier checkpoint)"


def _read(checkpoint: Path, name: str, read: Callable[[Path], Any]) -> Any:
    """`read(path)` for one file of `checkpoint`, any failure turned into a `CheckpointError` naming it."""
    path = checkpoint / name
    try:
        if not path.is_file():
            raise FileNotFoundError("missing")
        return read(path)
    except Exception as error:  # noqa: BLE001 - whatever a damaged or foreign file raises, it is named here
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise CheckpointError(f"cannot resume from {path}: {reason}; {_previous_checkpoint_hint(checkpoint)}"
                              ) from error


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _torch_load_weights_only(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, state: Any) -> None:
    # `load_state_dict` of torch's schedulers copies every key into the object: accept only the keys it saves
    expected = set(scheduler.state_dict())
    if not isinstance(state, dict) or set(state) != expected:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"expected the keys {sorted(expected)}; found {found}")
    scheduler.load_state_dict(state)


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    progress: TrainingProgress) -> None:
    """Restore what `save_checkpoint` wrote, without unpickling anything (see the module docstring).

    Raises:
        CheckpointError: naming the file that is missing, damaged or foreign, and the checkpoint to use instead.
    """
    legacy = sorted(path.name for path in checkpoint.glob("custom_checkpoint_*.pkl"))
    if legacy and not (checkpoint / PROGRESS_NAME).exists():
        raise CheckpointError(
            f"cannot resume from {checkpoint}: it was written by an older version ({legacy[0]}, a pickle that would "
            f"run code when loaded, is never read); start afresh or resume from a checkpoint of this version"
        )
    _read(checkpoint, PROGRESS_NAME, lambda path: progress.load_state_dict(_read_json(path)))
    _read(checkpoint, MODEL_NAME, lambda path: safetensors.torch.load_model(
        accelerator.unwrap_model(model), str(path), strict=True, device=str(accelerator.device)))
    _read(checkpoint, OPTIMIZER_NAME, lambda path: optimizer.load_state_dict(_torch_load_weights_only(path)))
    if accelerator.scaler is not None:
        _read(checkpoint, SCALER_NAME, lambda path: accelerator.scaler.load_state_dict(_torch_load_weights_only(path)))
    _read(checkpoint, SCHEDULER_NAME, lambda path: _load_scheduler(scheduler, _read_json(path)))
    _read(checkpoint, RANDOM_STATES_NAME.format(accelerator.process_index),
          lambda path: set_random_states(_read_json(path)))


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``latest`` = newest complete one in `checkpoint_dir` (None if there is none)."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX)):
        raise FileNotFoundError(f"--resume {resume!r} is not a checkpoint folder ({CHECKPOINT_PREFIX}<step>)")
    return path
