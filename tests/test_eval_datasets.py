"""Benchmark readers on small generated folder trees in each official / method-repo layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mask2anomaly_eval.datasets import BENCHMARKS, BenchmarkFrame, BenchmarkReader, get_benchmark


def write_image(path: Path, shape=(6, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*shape, 3), 128, np.uint8)).save(path)


def write_label(path: Path, values: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        image = Image.fromarray(values.astype(np.uint8), mode="P")
        image.putpalette([0, 0, 0] * 256)
    else:
        image = Image.fromarray(values.astype(np.uint8))
    image.save(path)


RAW = np.array([[0, 1, 2, 255], [4, 14, 13, 1]], np.uint8)


def frames_by_stem(benchmark) -> dict[str, np.ndarray]:
    frames = list(benchmark)
    assert all(isinstance(f, BenchmarkFrame) and f.labels.dtype == np.uint8 for f in frames)
    return {f.image_path.stem: f.labels for f in frames}


def test_smiyc_ra21_official_layout(tmp_path):
    for stem in ("validation0000", "validation0001", "test0000"):
        write_image(tmp_path / "images" / f"{stem}.jpg")
    raw = np.array([[0, 1, 255, 3]], np.uint8)
    write_label(tmp_path / "labels_masks" / "validation0000_labels_semantic.png", raw, mode="P")
    write_label(tmp_path / "labels_masks" / "validation0001_labels_semantic.png", np.zeros((1, 4)))
    benchmark = get_benchmark("smiyc_ra21", tmp_path)
    assert benchmark.track == "anomaly" and len(benchmark) == 2  # the unlabelled test frame is left out
    labels = frames_by_stem(benchmark)
    # 0 -> 0, 1 -> 1, anything else -> void, like the official reader
    assert labels["validation0000"].tolist() == [[0, 1, 255, 255]]


def test_smiyc_ro21_method_repo_layout_and_official_validation_split(tmp_path):
    for stem in ("validation_1", "validation_2", "validation_19", "validation_25"):
        write_image(tmp_path / "images" / f"{stem}.webp")
        write_label(tmp_path / "labels_masks" / f"{stem}.png", np.array([[0, 1, 255]]))
    benchmark = get_benchmark("smiyc_ro21", tmp_path)
    assert benchmark.track == "obstacle"
    assert sorted(p.stem for p in benchmark.image_paths) == ["validation_1", "validation_2"]
    assert next(iter(benchmark)).labels.tolist() == [[0, 1, 255]]


@pytest.mark.parametrize("name, image_dir, label_dir, ext", [
    ("fs_lostandfound", "images", "labels_masks", ".png"),
    ("fs_lostandfound", "original", "labels", ".png"),
    ("fs_static", "images", "labels_masks", ".jpg"),
    ("synthroad", "images", "labels", ".png"),
])
def test_binary_void_layouts(tmp_path, name, image_dir, label_dir, ext):
    values = np.array([[0, 1], [255, 0]])
    for stem in ("a", "b"):
        write_image(tmp_path / image_dir / f"{stem}{ext}")
        write_label(tmp_path / label_dir / f"{stem}.png", values)
    labels = frames_by_stem(get_benchmark(name, tmp_path))
    assert sorted(labels) == ["a", "b"] and labels["a"].tolist() == values.tolist()


def test_binary_void_layout_rejects_other_values(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    write_label(tmp_path / "labels_masks" / "a.png", np.array([[0, 1, 7]]))
    with pytest.raises(ValueError, match=r"a\.png contains the value\(s\) \[7\]"):
        list(get_benchmark("fs_static", tmp_path))


@pytest.mark.parametrize("label_dir, anomaly_value", [("labels", 1), ("labels_masks", 2)])
def test_road_anomaly(tmp_path, label_dir, anomaly_value):
    write_image(tmp_path / "images" / "animals01.jpg")
    write_label(tmp_path / label_dir / "animals01.png", np.array([[0, anomaly_value, 0]]))
    assert frames_by_stem(get_benchmark("road_anomaly", tmp_path))["animals01"].tolist() == [[0, 1, 0]]


def test_streethazards_official_layout_skips_images_without_anomaly(tmp_path):
    root = tmp_path / "test"
    write_image(root / "images" / "test" / "t5" / "300.png")
    write_label(root / "annotations" / "test" / "t5" / "300.png", RAW)
    write_image(root / "images" / "test" / "t5" / "301.png")
    write_label(root / "annotations" / "test" / "t5" / "301.png", np.array([[2, 3, 1]]))  # no class 14
    benchmark = get_benchmark("streethazards", root)
    assert len(benchmark) == 2
    labels = frames_by_stem(benchmark)
    assert list(labels) == ["300"]
    # 14 anomaly; 1 (unlabeled) and 4 (other) ignored; other classes inlier
    assert labels["300"].tolist() == [[0, 255, 0, 255], [255, 1, 0, 255]]


def test_missing_or_empty_folders_name_the_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'}.*expected layout.*labels_masks"):
        get_benchmark("smiyc_ra21", tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match=f"missing folder {tmp_path / 'labels_masks'}"):
        get_benchmark("smiyc_ra21", tmp_path)
    (tmp_path / "labels_masks").mkdir()
    write_image(tmp_path / "images" / "x.jpg")
    with pytest.raises(FileNotFoundError, match="no labelled image found"):
        get_benchmark("smiyc_ra21", tmp_path)
    with pytest.raises(FileNotFoundError, match="annotations"):
        get_benchmark("streethazards", tmp_path / "images" / "..")
    with pytest.raises(ValueError, match="unknown benchmark 'lostandfound'"):
        get_benchmark("lostandfound", tmp_path)


def test_rgb_label_image_is_rejected(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    write_image(tmp_path / "labels" / "a.png")  # an RGB picture instead of a label map
    with pytest.raises(ValueError, match="mode 'RGB'"):
        list(get_benchmark("synthroad", tmp_path))


def test_every_benchmark_documents_its_layout():
    assert set(BENCHMARKS) == {"smiyc_ra21", "smiyc_ro21", "fs_lostandfound", "fs_static", "road_anomaly",
                               "streethazards", "synthroad"}
    assert all("DIR/" in layout.description for layout in BENCHMARKS.values())


def test_registry_entries_name_their_track_title_and_convention():
    assert all(name == reader.name and reader.title for name, reader in BENCHMARKS.items())
    assert {name: reader.track for name, reader in BENCHMARKS.items() if reader.track != "anomaly"} == {
        "smiyc_ro21": "obstacle"}
    assert [name for name, reader in BENCHMARKS.items() if reader.skip_without_anomaly] == ["streethazards"]
    # the label conventions, on raw values each benchmark can hold
    def convert(name: str, raw: list[int]) -> list[int]:
        return BENCHMARKS[name].labels(np.array([raw], np.uint8), Path("x.png"))[0].tolist()

    assert convert("smiyc_ra21", [0, 1, 2, 14, 255]) == [0, 1, 255, 255, 255]
    assert convert("road_anomaly", [0, 1, 2, 255]) == [0, 1, 1, 255]
    assert convert("streethazards", [0, 1, 2, 4, 13, 14]) == [0, 255, 0, 255, 0, 1]
    for name in ("fs_lostandfound", "fs_static", "synthroad"):
        assert convert(name, [0, 1, 255]) == [0, 1, 255]


def test_adding_a_benchmark_is_one_registry_entry(tmp_path, monkeypatch):
    def find(root: Path) -> list[tuple[Path, Path]]:
        return [(image, root / "gt" / f"{image.stem}_gt.png") for image in sorted((root / "rgb").glob("*.png"))]

    def labels(raw: np.ndarray, path: Path) -> np.ndarray:
        return np.where(raw == 9, 1, 0).astype(np.uint8)

    monkeypatch.setitem(BENCHMARKS, "toy", BenchmarkReader("toy", "Toy", "DIR/rgb/<id>.png, DIR/gt/<id>_gt.png; 9 "
                                                           "anomaly", find, labels, track="obstacle"))
    write_image(tmp_path / "rgb" / "a.png")
    write_label(tmp_path / "gt" / "a_gt.png", np.array([[9, 3]]))
    benchmark = get_benchmark("toy", tmp_path)
    assert benchmark.track == "obstacle" and frames_by_stem(benchmark)["a"].tolist() == [[1, 0]]
