"""Fixtures the test modules share (paths are in `shared_paths.py`, helper functions in `tiny_models.py` and
`metric_cases.py`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import dynamic_module_utils

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation, Mask2AnomalyImageProcessor


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder written by `save_pretrained` of a tiny random model (seed 0) and a small-size image processor.
    Tests that change it restore it; copy it to change it for longer."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-model"
    torch.manual_seed(0)
    Mask2AnomalyForUniversalSegmentation(Mask2AnomalyConfig.tiny()).save_pretrained(folder)
    Mask2AnomalyImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def demo_onnx(tmp_path_factory) -> Path:
    """The demo model exported by the CLI (`mask2anomaly-export`) at 224x448 with a dynamic batch, verified by both
    runtimes at export time; shared by tests/test_export.py and tests/test_backends.py, whose tests that use it carry
    `shared_paths.SHARES_DEMO_EXPORT`."""
    from shared_paths import REPO_ROOT

    from modeling_mask2anomaly.export import main

    out = tmp_path_factory.mktemp("export") / "demo_onnx"
    assert main([str(REPO_ROOT / "demo_model"), "--output-dir", str(out), "--height", "224", "--width", "448",
                 "--dynamic", "--verify", "onnxruntime", "openvino"]) == 0
    return out
