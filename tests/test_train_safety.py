"""Hostile and damaged files around training (issue 12): resuming never unpickles anything from a checkpoint
folder, a damaged checkpoint stops the run naming the file and the previous checkpoint, and the final model folder
is written atomically with the usual file modes."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
import torch
from hostile_files import plant_pickle, plant_torch_pickle, truncate
from safetensors.torch import load_file
from tiny_models import TINY_TRAINING, tiny_config

from mask2anomaly_training.checkpoint import list_checkpoints
from mask2anomaly_training.train import main, train
from modeling_mask2anomaly.image_processing_mask2anomaly import Mask2AnomalyImageProcessor

STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step run with a checkpoint after every step (the last two are kept)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small shared machine: one thread is several times faster
    output = tmp_path_factory.mktemp("run")
    config = tiny_config("training.checkpoint_steps=1")
    train(config, output, stage=1, max_steps=STEPS)
    checkpoints = list_checkpoints(output / "checkpoints")
    assert [p.name for p in checkpoints] == ["checkpoint-00000002", "checkpoint-00000003"]
    yield config, output, checkpoints
    torch.set_num_threads(threads)


def _killed_run(checkpoints: list[Path], folder: Path) -> list[Path]:
    """A run folder holding copies of the given checkpoints (what a killed run left)."""
    for checkpoint in checkpoints:
        shutil.copytree(checkpoint, folder / "checkpoints" / checkpoint.name)
    return list_checkpoints(folder / "checkpoints")


def test_resume_never_unpickles_a_planted_file(run, tmp_path):
    """Code-running pickles planted under the names accelerate's `load_state` reads (`custom_checkpoint_<i>.pkl`
    with weights_only=False, `random_states_0.pkl`) are never read; under the names of the files that are read,
    each is refused naming the file. Nothing runs in any case."""
    config, output, checkpoints = run
    marker = tmp_path / "code-ran"
    resumed = tmp_path / "planted"
    (latest,) = _killed_run(checkpoints[-1:], resumed)
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "scaler.pt"):
        plant_pickle(latest / name, marker)
    train(config, resumed, stage=1, max_steps=STEPS, resume="latest")
    assert not marker.exists()
    expected, actual = load_file(output / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)

    for name in ("optimizer.bin", "model.safetensors", "scheduler.json", "progress.json", "random_states_0.json"):
        folder = tmp_path / f"planted-{name}"
        (latest,) = _killed_run(checkpoints[-1:], folder)
        plant_torch_pickle(latest / name, marker)
        with pytest.raises(ValueError, match=f"cannot resume from {latest / name}: "):
            train(config, folder, stage=1, max_steps=STEPS, resume="latest")
        assert not marker.exists(), name

    # a checkpoint of the old layout (its state only in pickles) is refused, not unpickled
    old = tmp_path / "old" / "checkpoints" / "checkpoint-00000003"
    old.mkdir(parents=True)
    shutil.copy(checkpoints[-1] / "model.safetensors", old)
    plant_pickle(old / "custom_checkpoint_0.pkl", marker)
    with pytest.raises(ValueError, match=r"older version \(custom_checkpoint_0\.pkl"):
        train(config, tmp_path / "old", stage=1, max_steps=STEPS, resume="latest")
    assert not marker.exists()


@pytest.mark.parametrize("damaged", ["random_states_0", "model.safetensors", "optimizer.bin", "progress.json"])
def test_damaged_latest_checkpoint_names_the_file_and_offers_the_previous(run, tmp_path, capsys, damaged):
    """A truncated file of the newest checkpoint (a disk that filled up, a copy cut short) stops the run before
    step 1 with the file's name and the previous checkpoint; it never continues with other random states."""
    config, _, checkpoints = run
    previous, latest = _killed_run(checkpoints, tmp_path / "damaged")
    files = sorted(latest.glob(f"{damaged}*"))
    assert files, f"the checkpoint has no {damaged} file"
    for path in files:
        truncate(path)
    with pytest.raises(ValueError, match=rf"cannot resume from {latest}/{damaged}.*--resume {previous}\b"):
        train(config, tmp_path / "damaged", stage=1, max_steps=STEPS, resume="latest")
    assert not (tmp_path / "damaged" / "model.safetensors").exists()

    # the command line says the same in one line
    with pytest.raises(SystemExit) as exited:
        main(["--output-dir", str(tmp_path / "damaged"), "--max-steps", str(STEPS), "--resume", *TINY_TRAINING,
              "training.checkpoint_steps=1"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("mask2anomaly-train: error: cannot resume from") and str(previous) in error


def test_final_model_folder_is_written_atomically_with_usual_modes(run, tmp_path, monkeypatch):
    """The final save is staged and renamed: an interrupted save (here the disk fills up while the processor is
    written) leaves no model file behind, not even a half-written one; a complete one has the usual modes."""
    config, output, _ = run
    umask = 0o666 & ~_umask()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "eval_results.json"):
        assert stat.S_IMODE((output / name).stat().st_mode) == umask, name

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Mask2AnomalyImageProcessor, "save_pretrained", full_disk)
    failed = tmp_path / "full-disk"
    with pytest.raises(OSError, match="No space left"):
        train(config, failed, stage=1, max_steps=1)
    left = sorted(path.name for path in failed.iterdir())
    # no config.json, no weights, no staging folder (mask2anomaly-stage1/ holds the TensorBoard events)
    assert left == ["checkpoints", "mask2anomaly-stage1", "training_config.yaml"], left


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("fault, message", [
    ("label_size", r"labels/scene_001\.png: the label is 64x32 but its image .*scene_001\.png is 128x64"),
    ("truncated_image", r"images/scene_002\.png: cannot read the training image"),
    ("label_values", r"labels/scene_000\.png: label values \[30, 200\] are not class ids 0\.\.18 nor 254, 255"),
    ("truncated_label", r"labels/scene_002\.png"),
])
def test_bad_training_data_is_named_before_step_one(tmp_path, monkeypatch, capsys, fault, message):
    """A label of the wrong size, a truncated image or label, or label values outside 0..18/254/255 stop the run
    before the first optimizer step, naming the file (they failed mid-run without it, or trained silently)."""
    import numpy as np
    from PIL import Image

    from mask2anomaly_training import train as train_module

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        image = rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"scene_{index:03d}.png")
        label = rng.integers(0, 19, (64, 128)).astype(np.uint8)
        label[:4] = 255
        label[4:8, :8] = 254
        Image.fromarray(label).save(root / "labels" / f"scene_{index:03d}.png")
    if fault == "label_size":
        Image.fromarray(np.zeros((32, 64), np.uint8)).save(root / "labels" / "scene_001.png")
    elif fault == "truncated_image":
        truncate(root / "images" / "scene_002.png")
    elif fault == "truncated_label":
        truncate(root / "labels" / "scene_002.png")
    else:
        label = np.zeros((64, 128), np.uint8)
        label[0, :3] = (30, 200, 254)
        Image.fromarray(label).save(root / "labels" / "scene_000.png")
    steps = []
    monkeypatch.setattr(train_module, "optimizer_step", lambda *args, **kwargs: steps.append(1) or {})
    config = tiny_config(f"data.train={{source: folder, root: {root}}}")
    with pytest.raises(ValueError, match=message) as error:
        train(config, tmp_path / "run", stage=1, max_steps=1)
    assert steps == [] and "\n" not in str(error.value)
