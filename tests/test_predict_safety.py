"""`mask2anomaly-predict` against hostile inputs and faults (issue 12): output names never collide, a failed write
never removes an earlier run's outputs, a NaN map is a failure, and every bad input or argument is one line while
the other inputs are still predicted."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_files import truncate
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_models import random_image, save_tiny_model

from modeling_mask2anomaly import predict as predict_module
from modeling_mask2anomaly.predict import main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("predict-safety") / "model", "random")


def _image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(random_image(height, width, seed=seed)).save(path)
    return path


def _predict(model_dir: Path, out: Path, *inputs, capsys, extra: tuple[str, ...] = ("--no-flip",)):
    code = main([*map(str, inputs), "--model", str(model_dir), "--output-dir", str(out), "--device", "cpu", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "mask2anomaly-predict:"))]


def test_output_names_are_unique_over_all_inputs(model_dir, tmp_path, capsys):
    """a/x.png, b/x.png and c/x-2.png gave two output sets for three inputs (b's renamed to x-2, then overwritten
    by c's): each input must get its own set, told apart here by the image sizes."""
    sizes = {"a/x.png": (20, 30), "b/x.png": (22, 34), "c/x-2.png": (26, 18)}
    for index, (name, (height, width)) in enumerate(sizes.items()):
        _image(tmp_path / "in" / name, height, width, seed=index)
    out = tmp_path / "out"
    code, stdout, _ = _predict(model_dir, out, *(tmp_path / "in" / name for name in sizes), capsys=capsys)
    assert code == 0
    maps = sorted(out.glob("*_anomaly.npy"))
    assert len(maps) == 3, [p.name for p in maps]
    assert sorted(np.load(p).shape for p in maps) == sorted(sizes.values())
    assert len(list(out.iterdir())) == 3 * len(predict_module.OUTPUT_SUFFIXES)


def test_a_failed_rerun_keeps_the_previous_outputs(model_dir, tmp_path, capsys, monkeypatch):
    """A re-run that fails while writing (a full disk) leaves the earlier run's complete outputs as they were."""
    image = _image(tmp_path / "in" / "road.png", 20, 30)
    out = tmp_path / "out"
    assert _predict(model_dir, out, image, capsys=capsys)[0] == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert len(before) == 3

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(predict_module, "render_semantic", full_disk)
    code, _, stderr = _predict(model_dir, out, image, capsys=capsys)
    assert code == 1 and "No space left on device" in stderr
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # no staging folder either


def test_a_non_finite_map_is_a_failure_and_nothing_is_written(model_dir, tmp_path, capsys):
    nan_model = tmp_path / "nan-model"
    shutil.copytree(model_dir, nan_model)
    weights = load_file(nan_model / "model.safetensors")
    weights["class_predictor.weight"] = torch.full_like(weights["class_predictor.weight"], float("nan"))
    save_file(weights, nan_model / "model.safetensors", metadata={"format": "pt"})
    good = _image(tmp_path / "in" / "road.png", 20, 30)
    out = tmp_path / "out"
    code, stdout, stderr = _predict(nan_model, out, good, capsys=capsys)
    assert code == 1 and stdout == ""
    (line,) = [line for line in _errors(stderr) if line.startswith("error:")]
    assert "road.png" in line and "non-finite anomaly scores" in line
    assert list(out.iterdir()) == []


def test_an_image_too_thin_to_resize_is_reported_and_the_rest_predicted(model_dir, tmp_path, capsys):
    thin = _image(tmp_path / "in" / "thin.png", 100000, 10)
    good = _image(tmp_path / "in" / "road.png", 20, 30)
    code, stdout, stderr = _predict(model_dir, tmp_path / "out", thin, good, capsys=capsys)
    assert code == 1
    (line,) = [line for line in _errors(stderr) if "thin.png" in line]
    assert "10x100000 image" in line and "--no-resize" in line
    assert stdout.startswith(str(good)) and len(stdout.splitlines()) == 1


def test_unreadable_folders_and_files_are_reported_and_the_rest_predicted(model_dir, tmp_path, capsys, monkeypatch):
    """A folder the user may not enter (simulated: the tests run as root, whom permissions do not stop): its
    sub-folder found while walking, and a file named inside it, are each reported; the other images predicted."""
    images = tmp_path / "images"
    good = _image(images / "road.png", 20, 30)
    hidden = _image(images / "locked" / "hidden.png", 20, 30)
    locked = os.path.abspath(images / "locked")
    real_scandir, real_stat = os.scandir, os.stat

    def inside_locked(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(locked + os.sep)

    def scandir(path="."):
        if isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fsdecode(path)) == locked:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    def stat(path, *args, **kwargs):
        if inside_locked(path):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "stat", stat)
    code, stdout, stderr = _predict(model_dir, tmp_path / "out", images, hidden, capsys=capsys)
    monkeypatch.undo()
    assert code == 1, stderr
    errors = _errors(stderr)
    assert any(line.startswith(f"error: {locked}: folder cannot be read (Permission denied)") for line in errors)
    assert any(line.startswith(f"error: {hidden}: cannot be read (Permission denied)") for line in errors)
    assert "Traceback" not in stderr
    assert [line.split(":")[0] for line in stdout.splitlines()] == [str(good)]


def test_output_dir_above_the_inputs(model_dir, tmp_path, capsys, monkeypatch):
    """`--output-dir .` with the inputs below it found "no input images"; a second run still does not predict
    on the first run's pictures."""
    _image(tmp_path / "images" / "road.png", 20, 30)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        code = main(["images", "--model", str(model_dir), "--output-dir", ".", "--device", "cpu", "--no-flip"])
        stdout = capsys.readouterr().out
        assert code == 0 and len(stdout.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.glob("road_*")) == ["road_anomaly.npy", "road_heatmap.png",
                                                               "road_semantic.png"]


def test_bad_model_or_output_dir_is_one_line_and_creates_nothing(model_dir, tmp_path, capsys):
    image = _image(tmp_path / "in" / "road.png", 20, 30)
    truncated = tmp_path / "truncated-model"
    shutil.copytree(model_dir, truncated)
    truncate(truncated / "model.safetensors", 0.3)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = [(tmp_path / "no-such-model", tmp_path / "out1", "model folder not found"),
             (truncated, tmp_path / "out2", "cannot load the model"),
             (model_dir, a_file, "is a file; expected a folder")]
    for model, out, message in cases:
        code, stdout, stderr = _predict(model, out, image, capsys=capsys)
        assert code == 2 and stdout == ""
        assert "Traceback" not in stderr
        errors = _errors(stderr)
        assert len(errors) == 1 and message in errors[0], stderr
        assert str(model) in errors[0] or str(out) in errors[0]
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
    assert a_file.read_text() == "not a folder"
