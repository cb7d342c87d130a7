"""Read the authors' checkpoints without running anything they contain.

`.pth` files (detectron2's checkpointer, `{"model": state_dict, ...}` or a bare state dict) are read with
`torch.load(weights_only=True)`; detectron2 `.pkl` files (numpy arrays) with an unpickler that rebuilds numpy
arrays and plain containers and refuses every other global.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging

from .errors import ConversionError, key_list

logger = logging.get_logger(__name__)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for detectron2 `.pkl` checkpoints that can rebuild numpy arrays and plain containers and
    nothing else: any other global a pickle names is refused before it could be called."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("collections", "OrderedDict"),
            # Python 2 / protocol-2 pickles spell byte strings as _codecs.encode(text, "latin1")
            ("_codecs", "encode"),
        }
    )

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise ConversionError(
            f"{self.source} asks to unpickle {module}.{name}; a detectron2 .pkl checkpoint should hold only numpy "
            "arrays, so it is refused rather than run"
        )


def _load_pkl(path: Path) -> object:
    with open(path, "rb") as handle:
        try:
            return _NumpyOnlyUnpickler(handle, str(path)).load()
        except ConversionError:
            raise
        except Exception as error:  # a truncated or non-pickle file
            raise ConversionError(f"{path} is not a readable detectron2 .pkl checkpoint: {error}") from None


def _load_pth(path: Path) -> object:
    # mmap keeps the tensors on disk until they are used (new zip format only), which halves peak memory.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{path} holds objects other than tensors and plain containers, which torch.load(weights_only=True) "
            f"refuses to rebuild ({str(error).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {str(error).splitlines()[0]}") from None


def load_official_state_dict(checkpoint_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict of an official checkpoint, as torch tensors.

    Accepts detectron2's `{"model": state_dict, "optimizer": ..., "scheduler": ..., "iteration": ...}` (only
    `model` is read) or a bare state dict, from `.pth` (`torch.load(weights_only=True)`) or detectron2 `.pkl`
    (numpy arrays, read by an unpickler that rebuilds nothing else).
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist")
    raw = _load_pkl(path) if path.suffix == ".pkl" else _load_pth(path)
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{path} holds a {type(raw).__name__}, expected a state dict or {{'model': state dict}}")
    if "model" in raw and isinstance(raw["model"], Mapping):
        others = sorted(str(k) for k in raw if k != "model")
        if others:
            logger.info(f"{path.name}: reading 'model', ignoring {', '.join(others)}")
        if raw.get("matching_heuristics"):
            logger.warning(f"{path.name} is marked for detectron2's name-matching heuristics; keys must still be detectron2 names")
        raw = raw["model"]
    state: dict[str, torch.Tensor] = {}
    bad = []
    for key, value in raw.items():
        if isinstance(value, torch.Tensor):
            state[str(key)] = value
        elif isinstance(value, np.ndarray) and value.dtype != object:
            # (np.ascontiguousarray would turn 0-d arrays such as num_batches_tracked into 1-d ones)
            state[str(key)] = torch.from_numpy(value if value.flags.c_contiguous else value.copy(order="C"))
        else:
            bad.append(str(key))
    if bad:
        raise ConversionError(f"{path}: entries that are not arrays: {key_list(bad)}")
    if not state:
        raise ConversionError(f"{path} holds no weights")
    # A state dict saved from a DistributedDataParallel wrapper carries a `module.` prefix on every key.
    if all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state



__all__ = ["load_official_state_dict"]
