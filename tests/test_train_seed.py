"""One `training.seed` makes a run repeatable on one machine: two runs of a few steps give identical weights.

Stage 2 from a fresh model exercises every random source at once: initialisation, data order, augmentation
(scale, crop, flip, colour jitter), outlier pasting (probability 1 here), the Hungarian matcher's and the mask
loss's point sampling, and the contrastive loss. The runs go through the public `train()` entry with loader
workers in one run and none in the other (the data must not depend on them); a third run with another seed
must differ, so the comparison can fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import TINY_TRAINING

from mask2anomaly_training.train import load_config, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

# the tiny training set-up, every image with a pasted outlier (stage 2 draws pasting, points and data order)
TINY_STAGE2 = [*TINY_TRAINING, "data.outlier_probability=1.0"]


def _run(folder: Path, seed: int, workers: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    config = load_config("synthroad", [*TINY_STAGE2, f"training.seed={seed}", f"data.num_workers={workers}"])
    train(config, folder, stage=2, max_steps=3)
    history = json.loads((folder / "eval_results.json").read_text())["history"]
    return load_file(folder / "model.safetensors"), [
        {k: v for k, v in entry.items() if k != "seconds_per_step"} for entry in history
    ]


def test_same_seed_gives_identical_weights_and_losses(tmp_path):
    first, first_losses = _run(tmp_path / "first", seed=0, workers=0)
    torch.rand(5)  # move the global generator on: train() must reseed it itself
    second, second_losses = _run(tmp_path / "second", seed=0, workers=2)
    assert first.keys() == second.keys()
    differ = [key for key in first if not torch.equal(first[key], second[key])]
    assert not differ, f"same seed, different weights: {differ[:5]}"
    assert first_losses == second_losses and len(first_losses) == 3

    other, other_losses = _run(tmp_path / "other", seed=1, workers=0)
    assert any(not torch.equal(first[key], other[key]) for key in first), "the seed changes nothing"
    assert other_losses != first_losses
