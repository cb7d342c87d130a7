"""Closed-set mIoU (`mask2anomaly_eval.semantic`): the confusion matrix and IoU by hand, and the command on a tiny
model over a generated SynthRoad val folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tiny_models import ROAD, save_tiny_model

from mask2anomaly_eval.semantic import confusion_matrix, iou_from_confusion, main
from mask2anomaly_training.synthroad import main as synthroad_main


def test_confusion_and_iou_by_hand():
    label = np.array([[0, 0, 1, 255], [1, 1, 2, 2]])
    prediction = np.array([[0, 1, 1, 0], [1, 1, 2, 0]])
    confusion = confusion_matrix(prediction, label, num_classes=4)
    # label 0: one right, one as 1; label 1: three right; label 2: one right, one as 0; the void pixel is left out
    assert confusion.sum() == 7
    assert confusion[0, 0] == 1 and confusion[0, 1] == 1 and confusion[1, 1] == 3
    assert confusion[2, 2] == 1 and confusion[2, 0] == 1
    iou, miou = iou_from_confusion(confusion)
    assert iou[0] == pytest.approx(1 / 3) and iou[1] == pytest.approx(3 / 4) and iou[2] == pytest.approx(1 / 2)
    assert np.isnan(iou[3])  # neither labelled nor predicted: not in the mean
    assert miou == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)


def test_predicted_but_absent_class_counts_as_zero():
    confusion = confusion_matrix(np.array([0, 1]), np.array([0, 0]), num_classes=2)
    iou, miou = iou_from_confusion(confusion)
    assert iou.tolist() == [0.5, 0.0] and miou == pytest.approx(0.25)


def test_sizes_must_match():
    with pytest.raises(ValueError, match="differ in size"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), num_classes=2)


def test_command_on_a_val_folder(tmp_path, capsys):
    data = tmp_path / "val"
    assert synthroad_main(["--split", "val", "--num", "2", "--height", "64", "--width", "128",
                           "--output-dir", str(data)]) == 0
    model = save_tiny_model(tmp_path / "model", behaviour="normal")  # predicts road everywhere
    out = tmp_path / "miou.json"
    assert main(["--model", str(model), "--data-dir", str(data), "--output", str(out), "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2 and 0.0 <= result["miou"] <= 1.0
    labels = np.concatenate([np.array(Image.open(p)).ravel() for p in sorted((data / "labels").glob("*.png"))])
    road = np.mean(labels[labels != 255] == ROAD)
    assert result["pixel_accuracy"] == pytest.approx(road, abs=0.05)  # road everywhere: accuracy = road's share
    assert "mIoU" in capsys.readouterr().out


def test_bad_input_is_one_line_naming_it(tmp_path, capsys):
    data = tmp_path / "val"
    assert synthroad_main(["--split", "val", "--num", "2", "--height", "64", "--width", "128",
                           "--output-dir", str(data)]) == 0
    model = save_tiny_model(tmp_path / "model", behaviour="normal")
    capsys.readouterr()

    assert main(["--model", str(tmp_path / "absent"), "--data-dir", str(data)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--model: model folder not found: {tmp_path / 'absent'}")

    assert main(["--model", str(model), "--data-dir", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--data-dir: missing folder {tmp_path / 'nothing' / 'images'}")

    bad = sorted((data / "labels").glob("*.png"))[1]
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(bad)  # not the image's size
    out = tmp_path / "miou.json"
    assert main(["--model", str(model), "--data-dir", str(data), "--output", str(out)]) == 2
    err = capsys.readouterr().err  # above the message: transformers' weight-loading progress bar
    assert "Traceback" not in err
    assert f"--data-dir: {bad}: " in err.strip().splitlines()[-1] and "differ in size" in err.strip().splitlines()[-1]
    assert not out.exists()  # no result written for a folder that could not be scored


def test_a_model_folder_that_does_not_load_is_named_as_the_model(tmp_path, capsys):
    """A data folder that is fine and a model folder with a broken config.json: the error names --model and the
    folder (it used to be labelled --data-dir, or to escape as a traceback)."""
    data = tmp_path / "val"
    assert synthroad_main(["--split", "val", "--num", "1", "--height", "64", "--width", "128",
                           "--output-dir", str(data)]) == 0
    model = save_tiny_model(tmp_path / "model", behaviour="normal")
    (model / "config.json").write_text("{not json")
    capsys.readouterr()
    assert main(["--model", str(model), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert f"--model: cannot load {model}: " in last and "--data-dir" not in last


def test_an_unreadable_image_is_named_as_data(tmp_path, capsys):
    data = tmp_path / "val"
    assert synthroad_main(["--split", "val", "--num", "2", "--height", "64", "--width", "128",
                           "--output-dir", str(data)]) == 0
    model = save_tiny_model(tmp_path / "model", behaviour="normal")
    broken = sorted((data / "images").glob("*.png"))[1]
    broken.write_bytes(b"not a png")
    capsys.readouterr()
    assert main(["--model", str(model), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "--data-dir: " in last and broken.name in last
