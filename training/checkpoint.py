"""Atomic checkpoints (`accelerator.save_state` into a temporary folder renamed when complete) and resumption."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

CHECKPOINT_PREFIX = "checkpoint-"
TMP_CHECKPOINT_PREFIX = ".tmp-checkpoint-"


@dataclass
class TrainingProgress:
    """Counters saved with every checkpoint (`accelerator.register_for_checkpointing`)."""

    step: int = 0
    stage: int = 1
    max_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
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


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed to ``checkpoint-<step>`` once every process has
    written its part, so a checkpoint folder is always complete; keeps the newest `keep` checkpoints."""
    directory = Path(checkpoint_dir)
    final = directory / checkpoint_name(step)
    temporary = directory / f"{TMP_CHECKPOINT_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
