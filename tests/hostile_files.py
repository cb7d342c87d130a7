"""Files a hostile user plants for the tests: pickles that run code when unpickled, truncated copies."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


class CodeRunningPickle:
    """Unpickling this object creates `marker` (any code could run instead: `open` stands for it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path: Path, marker: Path) -> None:
    """A plain pickle at `path` that creates `marker` when loaded."""
    path.write_bytes(pickle.dumps(CodeRunningPickle(marker)))


def plant_torch_pickle(path: Path, marker: Path) -> None:
    """A `torch.save` file at `path` that creates `marker` when loaded with ``weights_only=False``."""
    torch.save({"state": CodeRunningPickle(marker)}, path)


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut `path` to a fraction of its size (a copy interrupted or a disk that filled up)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
