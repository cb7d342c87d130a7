"""Tests of SynthRoad, the synthetic road-scene generator: determinism, label conventions, CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mask2anomaly_training import synthroad
from mask2anomaly_training.synthroad import generate_item, main, synthroad_dataset

H, W = 96, 192  # small scenes keep the tests fast; rendering is resolution independent


def _files(directory):
    return sorted(os.listdir(directory))


def test_same_seed_same_arrays_different_seed_or_index_differs():
    image_a, label_a = generate_item("train", 3, seed=7, height=H, width=W)
    image_b, label_b = generate_item("train", 3, seed=7, height=H, width=W)
    assert np.array_equal(image_a, image_b) and np.array_equal(label_a, label_b)
    image_c, _ = generate_item("train", 3, seed=8, height=H, width=W)
    image_d, _ = generate_item("train", 4, seed=7, height=H, width=W)
    image_e, _ = generate_item("val", 3, seed=7, height=H, width=W)
    for other in (image_c, image_d, image_e):
        assert np.mean(other != image_a) > 0.3


def test_shapes_and_dtypes():
    for split in synthroad.SPLITS:
        image, label = generate_item(split, 0, seed=0, height=80, width=120)
        assert image.shape == (80, 120, 3) and image.dtype == np.uint8
        assert label.shape == (80, 120) and label.dtype == np.uint8


def test_train_labels_are_train_ids_and_cover_most_classes():
    seen: set[int] = set()
    for index in range(10):
        image, label = generate_item("train", index, seed=1, height=H, width=W)
        values = set(np.unique(label).tolist())
        assert values <= set(range(19)) | {255}
        seen |= values
        # A road scene: sky above road, road in the bottom half.
        rows = np.arange(H)[:, None].repeat(W, 1)
        assert rows[label == synthroad.SKY].mean() < rows[label == synthroad.ROAD].mean()
        assert (label[H // 2 :] == synthroad.ROAD).mean() > 0.2
    assert {0, 1, 2, 5, 7, 8, 10, 11, 13} <= seen
    assert len(seen & set(range(19))) >= 14


def test_anomaly_split_labels_and_void_ring():
    with_anomaly = 0
    for index in range(8):
        _, label = generate_item("anomaly", index, seed=2, height=H, width=W)
        assert set(np.unique(label).tolist()) <= {0, 1, 255}
        anomaly = label == 1
        with_anomaly += bool(anomaly.any())
        # Naive check of the border: no anomaly pixel touches a "not anomaly" pixel (4-neighbourhood).
        for y, x in zip(*np.nonzero(anomaly)):
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < H and 0 <= xx < W:
                    assert label[yy, xx] != 0, (index, y, x)
    assert with_anomaly >= 6


def test_obstacle_split_voids_everything_off_the_road():
    with_obstacle = 0
    for index in range(8):
        _, label = generate_item("obstacle", index, seed=2, height=H, width=W)
        assert set(np.unique(label).tolist()) <= {0, 1, 255}
        with_obstacle += bool((label == 1).any())
        assert (label == 0).mean() > 0.15  # the road is labelled
        assert (label[: H // 4] == 255).all()  # sky and facades are not: top rows are off the road
    assert with_obstacle >= 6


def test_outliers_are_binary_masks_with_objects():
    for index in range(6):
        image, mask = generate_item("outliers", index, seed=0, height=H, width=W)
        assert set(np.unique(mask).tolist()) <= {0, 1}
        assert 0.005 < mask.mean() < 0.9


def test_cli_writes_deterministic_files_independent_of_num(tmp_path, capsys):
    out_a, out_b, out_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["--split", "anomaly", "--num", "3", "--seed", "5", "--output-dir", str(out_a),
                 "--height", str(H), "--width", str(W)]) == 0
    assert "wrote 3 anomaly items" in capsys.readouterr().out
    main(["--split", "anomaly", "--num", "3", "--seed", "5", "--output-dir", str(out_b), "--height", str(H),
          "--width", str(W)])
    main(["--split", "anomaly", "--num", "2", "--seed", "5", "--output-dir", str(out_c), "--height", str(H),
          "--width", str(W)])
    names = [f"synthroad_anomaly_{i:06d}.png" for i in range(3)]
    for sub in ("images", "labels"):
        assert _files(out_a / sub) == names  # no temporary files left behind
        for name in names:
            assert (out_a / sub / name).read_bytes() == (out_b / sub / name).read_bytes()
        for name in names[:2]:
            assert (out_a / sub / name).read_bytes() == (out_c / sub / name).read_bytes()
    # The files hold what the Python API renders.
    image, label = generate_item("anomaly", 1, seed=5, height=H, width=W)
    assert np.array_equal(np.asarray(Image.open(out_a / "images" / names[1])), image)
    assert np.array_equal(np.asarray(Image.open(out_a / "labels" / names[1])), label)


def test_cli_write_is_atomic(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        main(["--split", "outliers", "--num", "1", "--output-dir", str(tmp_path), "--height", "64", "--width", "64"])
    assert _files(tmp_path / "images") == [] and _files(tmp_path / "labels") == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--split", "train", "--num", "0"], "num=0"),
        (["--split", "train", "--num", "2", "--seed", "-1"], "seed=-1"),
        (["--split", "train", "--num", "2", "--height", "10"], "height=10"),
        (["--split", "bogus", "--num", "2"], "invalid choice"),
        (["--split", "train", "--num", "two"], "invalid int value"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "images").exists() or not os.listdir(tmp_path / "out" / "images")


def test_dataset_matches_generator(tmp_path):
    dataset = synthroad_dataset("obstacle", 2, seed=4, height=64, width=128, cache_dir=str(tmp_path))
    assert dataset.column_names == ["image", "label"] and len(dataset) == 2
    for index in range(2):
        image, label = generate_item("obstacle", index, seed=4, height=64, width=128)
        row = dataset[index]
        assert np.array_equal(np.asarray(row["image"]), image)
        assert np.array_equal(np.asarray(row["label"]), label)
    with pytest.raises(ValueError, match="split='test'"):
        synthroad_dataset("test", 2)


def test_cli_help_imports_neither_torch_nor_transformers_nor_datasets():
    # a numpy/PIL generator: `mask2anomaly-synthroad --help` must not pay for the model stack
    code = ("import sys\nfrom mask2anomaly_training.synthroad import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--output-dir" in result.stdout and result.stdout.strip().endswith("[]"), result.stdout
