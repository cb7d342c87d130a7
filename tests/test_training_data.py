"""Tests of the training data: Cityscapes/COCO/folder readers on tiny real-layout trees, and the augmentation
chain with outlier pasting (labels, probability, determinism, DataLoader workers, geometric consistency)."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from mask2anomaly_training import data
from mask2anomaly_training.synthroad import generate_item
from mask2anomaly_training.transforms import (
    Compose,
    OutlierPaste,
    PhotometricDistortion,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResize,
    TrainTransform,
    add_sample_index,
    build_train_augmentation,
    paste_outlier,
)

# Cityscapes label definitions typed from the official list (name, id, trainId); -1/255 = ignored.
CITYSCAPES_LABELS = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
]


def _save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ------------------------------------------------------------------------------------------- Cityscapes
def _cityscapes_tree(root, rng):
    stems = [("aachen", "aachen_000000_000019"), ("aachen", "aachen_000001_000019"), ("bremen", "bremen_000000_000019")]
    truth = {}
    for city, stem in stems:
        image = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)
        ids = rng.integers(0, 34, (8, 16), dtype=np.uint8)
        _save(image, root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png")
        _save(ids, root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png")
        truth[stem] = (image, ids)
    return truth


def test_cityscapes_reader_maps_label_ids_to_train_ids(tmp_path):
    truth = _cityscapes_tree(tmp_path / "cs", np.random.default_rng(0))
    dataset = data.cityscapes_dataset(str(tmp_path / "cs"), "train", cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 3 and set(dataset.column_names) == {"image", "label"}
    reference = {label_id: train_id for _, label_id, train_id in CITYSCAPES_LABELS}
    for row, stem in zip(dataset, sorted(truth)):
        image, ids = truth[stem]
        expected = np.array([[reference[int(v)] for v in line] for line in ids], np.uint8)
        assert np.array_equal(np.asarray(row["image"]), image)
        assert np.array_equal(np.asarray(row["label"]), expected)


def test_cityscapes_reader_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        data.cityscapes_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    (tmp_path / "empty" / "gtFine" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no Cityscapes images"):
        data.cityscapes_dataset(str(tmp_path / "empty"))
    _cityscapes_tree(tmp_path / "cs", np.random.default_rng(0))
    (tmp_path / "cs" / "gtFine" / "train" / "bremen" / "bremen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="bremen_000000_000019_gtFine_labelIds.png"):
        data.cityscapes_dataset(str(tmp_path / "cs"))


# ------------------------------------------------------------------------------------------------- COCO
def _column_major_runs(mask):
    """Naive COCO RLE encoding: run lengths over the column-major pixels, starting with a background run."""
    flat = [int(v) for v in mask.T.reshape(-1)]
    runs, current, length = [], 0, 0
    for value in flat:
        if value == current:
            length += 1
        else:
            runs.append(length)
            current, length = value, 1
    runs.append(length)
    return runs


def _inside(x: float, y: float, polygon) -> bool:
    """Even-odd test of point (x, y) against a flat [x0, y0, x1, y1, ...] polygon."""
    xs, ys, inside = polygon[0::2], polygon[1::2], False
    for i in range(len(xs)):
        x1, y1, x2, y2 = xs[i], ys[i], xs[i - 1], ys[i - 1]
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def _naive_polygon_mask(polygon, height, width):
    """COCO's convention, written out: a pixel belongs to the polygon when its centre does."""
    return np.array([[_inside(x + 0.5, y + 0.5, polygon) for x in range(width)] for y in range(height)])


def test_coco_polygon_rasterisation_matches_a_naive_rasteriser():
    # simple polygons (a rectangle at fractional coordinates, a triangle) against the pixel-centre rule
    for polygon in ([2.3, 3.2, 9.6, 3.2, 9.6, 7.7, 2.3, 7.7], [1.0, 1.0, 11.0, 2.0, 4.0, 9.0]):
        assert np.array_equal(data.annotation_mask([polygon], 12, 14), _naive_polygon_mask(polygon, 12, 14))
    # integer corners: [2, 10) x [3, 8), not PIL's inclusive fill
    expected = np.zeros((12, 14), bool)
    expected[3:8, 2:10] = True
    assert np.array_equal(data.annotation_mask([[2, 3, 10, 3, 10, 8, 2, 8]], 12, 14), expected)


def test_coco_annotations_match_pycocotools():
    from pycocotools import mask as coco_mask

    height, width = 24, 31
    # several parts (one overlapping another, one too short to be a polygon and ignored by both)
    parts = [[2.2, 1.3, 12.7, 1.6, 12.1, 10.4, 1.9, 9.8], [10.0, 8.0, 20.5, 9.0, 15.0, 20.0], [25, 2, 30, 2],
             [22.5, 14.2, 29.1, 13.0, 30.4, 22.8, 24.0, 23.5, 21.3, 18.0]]
    reference = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects([p for p in parts if len(p) >= 6],
                                                                       height, width))).astype(bool)
    assert reference.sum() > 100 and np.array_equal(data.annotation_mask(parts, height, width), reference)
    # a ring (an object with a hole) as uncompressed RLE (crowd), as a compressed string and as bytes
    ring = np.zeros((height, width), bool)
    ring[3:20, 4:25] = True
    ring[8:14, 9:18] = False
    uncompressed = {"size": [height, width], "counts": _column_major_runs(ring)}
    compressed = coco_mask.encode(np.asfortranarray(ring.astype(np.uint8)))
    assert np.array_equal(coco_mask.decode(coco_mask.frPyObjects(uncompressed, height, width)).astype(bool), ring)
    for rle in (uncompressed, {"size": compressed["size"], "counts": compressed["counts"].decode()}, compressed):
        assert np.array_equal(data.annotation_mask(rle, height, width), ring)
    # worked by hand: runs 2 off, 3 on, 4 off, column-major, as a list and as the string "234"
    expected = np.zeros(9, bool)
    expected[2:5] = True
    for counts in ([2, 3, 4], "234"):
        assert np.array_equal(data.annotation_mask({"size": [3, 3], "counts": counts}, 3, 3), expected.reshape(3, 3).T)
    with pytest.raises(ValueError, match="runs sum to 9"):
        data.annotation_mask({"size": [3, 4], "counts": [2, 3, 4]}, 3, 4)
    with pytest.raises(ValueError, match=r"size \[3, 3\] does not match its image size \[3, 4\]"):
        data.annotation_mask({"size": [3, 3], "counts": [2, 3, 4]}, 3, 4)


def _coco_tree(root, rng):
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"},
                  {"id": 38, "name": "kite"}]
    sizes = {1: (30, 40), 2: (30, 40), 3: (12, 40), 4: (30, 40)}
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w} for i, (h, w) in sizes.items()]
    for i, (h, w) in sizes.items():
        path = root / "train2017" / f"{i:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)
    crowd = np.zeros((30, 40), bool)
    crowd[20:26, 30:38] = True
    annotations = [
        # image 1: a dog (rectangle polygon: pixels [2, 10) x [3, 8), pycocotools' convention) and a crowd of
        # kites (RLE) -> kept
        {"id": 1, "image_id": 1, "category_id": 18, "iscrowd": 0, "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8]]},
        {"id": 2, "image_id": 1, "category_id": 38, "iscrowd": 1,
         "segmentation": {"size": [30, 40], "counts": _column_major_runs(crowd)}},
        # image 2: a dog and a person -> excluded
        {"id": 3, "image_id": 2, "category_id": 18, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 5]]},
        {"id": 4, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 5]]},
        # image 3: too small (12 px high)
        {"id": 5, "image_id": 3, "category_id": 18, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 5]]},
        # image 4: no annotation at all
    ]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    expected = crowd.copy()
    expected[3:8, 2:10] = True
    return expected


def test_coco_outliers_filtered_like_meta_ood(tmp_path):
    expected = _coco_tree(tmp_path / "coco", np.random.default_rng(1))
    dataset = data.coco_outlier_dataset(str(tmp_path / "coco"), min_size=20, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 1 and set(dataset.column_names) == {"image", "mask"}
    row = dataset[0]
    assert row["image"].size == (40, 30)
    assert np.array_equal(np.asarray(row["mask"]), expected.astype(np.uint8))
    with_empty = data.coco_outlier_dataset(str(tmp_path / "coco"), min_size=20, keep_empty=True,
                                           cache_dir=str(tmp_path / "cache"))
    assert len(with_empty) == 2 and not np.asarray(with_empty[1]["mask"]).any()
    assert len(data.coco_outlier_dataset(str(tmp_path / "coco"), min_size=10, cache_dir=str(tmp_path / "cache"))) == 2
    with pytest.raises(ValueError, match="no COCO image"):
        data.coco_outlier_dataset(str(tmp_path / "coco"), min_size=480, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        data.coco_outlier_dataset(str(tmp_path / "coco"), split="val2017")


def test_mask_folder_and_synthroad_outlier_sources(tmp_path):
    rng = np.random.default_rng(2)
    for stem in ("a", "b"):
        _save(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8), tmp_path / "ade" / "images" / f"{stem}.jpg")
        _save((rng.random((6, 7)) > 0.5).astype(np.uint8) * 255, tmp_path / "ade" / "masks" / f"{stem}.png")
    dataset = data.paired_folder_dataset(str(tmp_path / "ade"))
    assert len(dataset) == 2 and dataset.column_names == ["image", "mask"]
    assert np.asarray(dataset[1]["mask"]).shape == (6, 7)
    _save(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8), tmp_path / "ade" / "images" / "c.png")
    with pytest.raises(FileNotFoundError, match="c.png"):
        data.paired_folder_dataset(str(tmp_path / "ade"))
    synth = data.synthroad_outlier_dataset(3, seed=0, height=64, width=64, cache_dir=str(tmp_path / "cache"))
    assert synth.column_names == ["image", "mask"] and len(synth) == 3
    assert np.array_equal(np.asarray(synth[2]["mask"]), generate_item("outliers", 2, 0, 64, 64)[1])


# --------------------------------------------------------------------------------------------- pasting
def _find_offsets(label, pattern, value=254):
    """All (y, x) where `pattern` placed at (y, x) reproduces exactly the set of `value` pixels."""
    hits = []
    target = label == value
    for y in range(label.shape[0] - pattern.shape[0] + 1):
        for x in range(label.shape[1] - pattern.shape[1] + 1):
            placed = np.zeros_like(target)
            placed[y : y + pattern.shape[0], x : x + pattern.shape[1]] = pattern
            if np.array_equal(placed, target):
                hits.append((y, x))
    return hits


def test_paste_labels_exactly_the_mask_and_keeps_the_rest():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (12, 16), dtype=np.uint8)
    outlier = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    mask = np.zeros((10, 10), bool)
    mask[2:7, 3:5] = True  # an L shape inside a larger frame
    mask[6, 5:8] = True
    pattern = mask[2:7, 3:8]
    for seed in range(5):
        out_image, out_label = paste_outlier(image, label, outlier, mask, np.random.default_rng(seed))
        offsets = _find_offsets(out_label, pattern)
        assert len(offsets) == 1
        y, x = offsets[0]
        pasted = out_label == 254
        assert np.array_equal(out_image[y : y + 5, x : x + 5][pattern], outlier[2:7, 3:8][pattern])
        assert np.array_equal(out_image[~pasted], image[~pasted])
        assert np.array_equal(out_label[~pasted], label[~pasted])


def test_paste_crops_outliers_larger_than_the_image():
    rng = np.random.default_rng(4)
    image = np.zeros((6, 8, 3), np.uint8)
    label = np.zeros((6, 8), np.uint8)
    outlier = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.ones((20, 30), bool)
    out_image, out_label = paste_outlier(image, label, outlier, mask, np.random.default_rng(0))
    assert (out_label == 254).all()
    windows = [(y, x) for y in range(15) for x in range(23) if np.array_equal(outlier[y : y + 6, x : x + 8], out_image)]
    assert len(windows) == 1


def test_paste_probability_matches_p():
    source = [{"image": np.full((3, 3, 3), 9, np.uint8), "mask": np.ones((3, 3), np.uint8)}]
    paste = OutlierPaste(source, probability=0.2)
    image, label = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)
    draws = 4000
    pasted = sum((paste(image, label, np.random.default_rng([7, i]))[1] == 254).any() for i in range(draws))
    # Binomial(4000, 0.2): standard deviation 25.3; allow 4 of them.
    assert abs(pasted - 0.2 * draws) < 4 * np.sqrt(draws * 0.2 * 0.8)
    with pytest.raises(ValueError, match="probability=1.5"):
        OutlierPaste(source, probability=1.5)


# ------------------------------------------------------------------------------------------ geometry
def _coded_outlier(size=40):
    """Outlier whose colour encodes its own position (R = row, B = column) with G = 0."""
    rows, cols = np.mgrid[0:size, 0:size]
    image = np.stack([rows * 5, np.zeros_like(rows), cols * 5], axis=-1).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[5:35, 8:30] = 1
    mask[5:12, 8:12] = 0
    return image, mask


def _scene(height=64, width=128):
    image, label = generate_item("train", 0, seed=0, height=height, width=width)
    image = image.copy()
    image[..., 1] = np.maximum(image[..., 1], 1)  # scene pixels never have G = 0
    return image, label


def test_outlier_pixels_follow_crop_and_flip():
    image, label = _scene()
    outlier, mask = _coded_outlier()
    chain = Compose([OutlierPaste([{"image": outlier, "mask": mask}], probability=1.0), RandomResize((1.0, 1.0)),
                     RandomCrop((48, 96)), RandomHorizontalFlip(0.5)])
    flips = set()
    for seed in range(12):
        out_image, out_label = chain(image, label, np.random.default_rng(seed))
        assert out_image.shape == (48, 96, 3) and out_label.shape == (48, 96)
        pasted = out_label == 254
        assert np.array_equal(pasted, out_image[..., 1] == 0)
        if not pasted.any():
            continue
        ys, xs = np.nonzero(pasted)
        src_rows, src_cols = out_image[ys, xs, 0] // 5, out_image[ys, xs, 2] // 5
        # One translation (and maybe a mirror) maps every pasted pixel back to its source position.
        assert len(np.unique(src_rows - ys)) == 1
        mirrored = len(np.unique(src_cols + xs)) == 1
        assert mirrored or len(np.unique(src_cols - xs)) == 1
        flips.add(mirrored)
        # Every pasted pixel comes from the mask.
        assert mask[src_rows, src_cols].all()
        # Outside the paste, the label is a crop of the scene label (possibly mirrored).
        assert set(np.unique(out_label[~pasted]).tolist()) <= set(np.unique(label).tolist())
    assert flips == {True, False}


def test_outlier_pixels_survive_resize():
    image, label = _scene()
    outlier, mask = _coded_outlier()
    chain = Compose([OutlierPaste([{"image": outlier, "mask": mask}], probability=1.0), RandomResize((0.6, 1.8)),
                     RandomCrop((48, 96))])
    checked = 0
    for seed in range(8):
        out_image, out_label = chain(image, label, np.random.default_rng(seed))
        pasted = out_label == 254
        interior = ndimage.binary_erosion(pasted, iterations=2)  # bilinear blending reaches about 1 pixel
        if interior.any():
            assert (out_image[..., 1][interior] == 0).all()  # interior pixels keep the outlier's colours
            checked += 1
    assert checked >= 4


def test_crop_pads_small_images_with_void():
    image = np.full((5, 6, 3), 200, np.uint8)
    label = np.full((5, 6), 3, np.uint8)
    out_image, out_label = RandomCrop((8, 10))(image, label, np.random.default_rng(0))
    expected_label = np.full((8, 10), 255, np.uint8)
    expected_label[:5, :6] = 3
    expected_image = np.zeros((8, 10, 3), np.uint8)
    expected_image[:5, :6] = 200
    assert np.array_equal(out_label, expected_label) and np.array_equal(out_image, expected_image)


def test_photometric_distortion_brightness_only():
    rng = np.random.default_rng(5)
    image = rng.integers(60, 190, (10, 12, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (10, 12), dtype=np.uint8)
    jitter = PhotometricDistortion(brightness_delta=32, contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=0)
    changed = 0
    for seed in range(10):
        out_image, out_label = jitter(image, label, np.random.default_rng(seed))
        assert np.array_equal(out_label, label)
        diff = out_image.astype(int) - image.astype(int)
        assert diff.max() - diff.min() <= 1 and abs(diff.mean()) <= 33  # one common offset within +-32
        changed += bool(diff.any())
    assert 2 <= changed <= 9
    full = PhotometricDistortion()
    outs = {full(image, label, np.random.default_rng(s))[0].tobytes() for s in range(6)}
    assert len(outs) >= 4


# ------------------------------------------------------------------------------- datasets and workers
def _road_dataset(num=6):
    rows = [generate_item("train", i, seed=0, height=64, width=128) for i in range(num)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(r[0]) for r in rows], "label": [Image.fromarray(r[1]) for r in rows]},
        features=features)


def _outlier_source():
    outlier, mask = _coded_outlier(24)
    return [{"image": outlier, "mask": mask}]


def test_train_transform_is_deterministic_per_seed_epoch_index():
    augmentation = build_train_augmentation((48, 96), (0.75, 1.5), outlier_source=_outlier_source(),
                                            outlier_probability=0.5)
    transform = TrainTransform(augmentation, seed=11)
    dataset = add_sample_index(_road_dataset(3)).with_transform(transform)
    first = [dataset[i] for i in range(3)]
    again = [dataset[i] for i in range(3)]
    for a, b in zip(first, again):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    assert first[0]["image"].shape == (48, 96, 3) and first[0]["label"].dtype == np.uint8
    transform.set_epoch(1)
    assert any(not np.array_equal(dataset[i]["image"], first[i]["image"]) for i in range(3))
    with pytest.raises(KeyError, match="add_sample_index"):
        _road_dataset(1).with_transform(transform)[0]


def test_two_workers_give_the_same_batches_as_zero():
    augmentation = build_train_augmentation((48, 96), (0.75, 1.5), outlier_source=_outlier_source(),
                                            outlier_probability=0.5)
    dataset = add_sample_index(_road_dataset(6)).with_transform(TrainTransform(augmentation, seed=3))

    def batches(workers):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers)
        return [(b["image"].clone(), b["label"].clone(), b["sample_index"].clone()) for b in loader]

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 3
    for (image_a, label_a, index_a), (image_b, label_b, index_b) in zip(serial, parallel):
        assert torch.equal(image_a, image_b) and torch.equal(label_a, label_b) and torch.equal(index_a, index_b)
    assert any((label == 254).any() for _, label, _ in serial)
