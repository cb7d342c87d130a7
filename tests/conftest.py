"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation, Mask2AnomalyImageProcessor


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder written by `save_pretrained` of a tiny random model (seed 0) and a small-size image processor.
    Tests that change it restore it; copy it to change it for longer."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-model"
    torch.manual_seed(0)
    Mask2AnomalyForUniversalSegmentation(Mask2AnomalyConfig.tiny()).save_pretrained(folder)
    Mask2AnomalyImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(folder)
    return folder
