"""Fixtures the test modules share (paths are in `shared_paths.py`, helper functions in `tiny_models.py` and
`metric_cases.py`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import dynamic_module_utils

@pytest.fixture
def single_thread() -> Iterator[None]:
    """One torch thread: the tiny models run ~8x faster than with threads fighting over a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def isolated_remote_code(tmp_path, monkeypatch) -> Iterator[Path]:
    """Remote code loaded in this process goes to a temporary modules cache and is forgotten afterwards."""
    cache = tmp_path / "hf_modules"
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
        monkeypatch.delitem(sys.modules, name)
    yield cache
    for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
        del sys.modules[name]
