"""Dataset readers for training: Cityscapes and the outlier-exposure sources, as Hugging Face `datasets`.

Everything is read from local folders (no network):

- `cityscapes_dataset`: Cityscapes in its official layout, label ids mapped to the 19 train ids (255 void).
- `coco_outlier_dataset`: COCO train2017 filtered as the Meta-OoD preparation used by Mask2Anomaly does (no
  person, bicycle, car, motorcycle, bus, truck, traffic light or stop sign; both sides >= 480 px); the
  outlier mask is the union of the image's instance masks (polygons and RLE, crowd annotations included),
  rasterised by `pycocotools.mask`.
- `paired_folder_dataset`: any folder of images with same-stem masks or labels (ADE20K object cut-outs, one's
  own outliers, or a SynthRoad split written by ``mask2anomaly-synthroad``).
- `synthroad_outlier_dataset`: SynthRoad's ``outliers`` split.

Road datasets have the columns ``image`` (RGB) and ``label`` (train ids); outlier sources have ``image`` and
``mask`` (nonzero = outlier pixel), all `datasets.Image` features. Images are stored by path and decoded on
access; derived labels/masks are encoded once into the `datasets` cache, keyed by the files' sizes and
modification times so that a changed folder is re-read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import datasets
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from transformers.utils import logging

from mask2anomaly_eval.io import read_label_png
from modeling_mask2anomaly.image_processing_mask2anomaly import IMAGE_EXTENSIONS

from .synthroad import synthroad_dataset

logger = logging.get_logger(__name__)

IGNORE_LABEL = 255
OUTLIER_MASK_COLUMN = "mask"

# Cityscapes label id -> train id, from the Cityscapes label definitions (cityscapesScripts `labels.py`):
# the 19 evaluated classes get train ids 0..18, every other id (unlabeled, ego vehicle, rectification border,
# out of roi, static, dynamic, ground, parking, rail track, guard rail, bridge, tunnel, polegroup, caravan,
# trailer, license plate) is ignored.
CITYSCAPES_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}


def _id_lookup_table() -> np.ndarray:
    table = np.full(256, IGNORE_LABEL, np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
        table[label_id] = train_id
    return table


_CITYSCAPES_LUT = _id_lookup_table()


def cityscapes_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a Cityscapes ``*_gtFine_labelIds.png`` array (uint8 (H, W)) to train ids (uint8 (H, W), 255 void)."""
    label_ids = np.asarray(label_ids)
    if label_ids.dtype != np.uint8:
        if label_ids.min(initial=0) < 0 or label_ids.max(initial=0) > 255:
            raise ValueError(f"Cityscapes label ids must lie in 0..255, got {label_ids.min()}..{label_ids.max()}")
        label_ids = label_ids.astype(np.uint8)
    return _CITYSCAPES_LUT[label_ids]


# ------------------------------------------------------------------------------------------------ helpers
def _files_key(paths: Iterable[str]) -> list[tuple[str, int, int]]:
    """What identifies the content of files cheaply: path, size, modification time (ns)."""
    key = []
    for path in paths:
        stat = os.stat(path)
        key.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
    return key


def _cached_dataset(generator: Callable[..., Iterator[dict]], gen_kwargs: dict, features: datasets.Features,
                    key: object, cache_dir: str | None) -> datasets.Dataset:
    """`Dataset.from_generator` under an explicit fingerprint of `key` (hashing generators is slow and fragile)."""
    fingerprint = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    return datasets.Dataset.from_generator(generator, features=features, gen_kwargs=gen_kwargs,
                                           fingerprint=fingerprint, cache_dir=cache_dir)


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: expected a folder at {path!r}, found none")


# --------------------------------------------------------------------------------------------- Cityscapes
def cityscapes_pairs(root: str, split: str = "train") -> list[tuple[str, str]]:
    """(image path, labelIds path) pairs of a Cityscapes `split`, sorted by image path.

    Layout: ``root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png`` and
    ``root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png``.
    """
    image_root = os.path.join(root, "leftImg8bit", split)
    label_root = os.path.join(root, "gtFine", split)
    _require_dir(image_root, f"Cityscapes images of split {split!r}")
    _require_dir(label_root, f"Cityscapes gtFine labels of split {split!r}")
    pairs = []
    for city in sorted(os.listdir(image_root)):
        city_dir = os.path.join(image_root, city)
        if not os.path.isdir(city_dir):
            continue
        for name in sorted(os.listdir(city_dir)):
            if not name.endswith("_leftImg8bit.png"):
                continue
            stem = name[: -len("_leftImg8bit.png")]
            label_path = os.path.join(label_root, city, f"{stem}_gtFine_labelIds.png")
            if not os.path.isfile(label_path):
                raise FileNotFoundError(
                    f"Cityscapes image {os.path.join(city_dir, name)!r} has no label file: expected {label_path!r}")
            pairs.append((os.path.join(city_dir, name), label_path))
    if not pairs:
        raise FileNotFoundError(f"no Cityscapes images '*_leftImg8bit.png' found under {image_root!r}/<city>/")
    return pairs


def _cityscapes_generator(pairs: Sequence[tuple[str, str]]) -> Iterator[dict]:
    for image_path, label_path in pairs:
        train_ids = cityscapes_ids_to_train_ids(read_label_png(label_path))
        yield {"image": image_path, "label": Image.fromarray(train_ids)}


def cityscapes_dataset(root: str, split: str = "train", cache_dir: str | None = None) -> datasets.Dataset:
    """Cityscapes `split` ("train", "val", ...) with columns ``image`` and ``label`` (train ids, 255 void)."""
    pairs = cityscapes_pairs(root, split)
    logger.info(f"Cityscapes {split}: {len(pairs)} images under {root}")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    key = ("cityscapes-v1", _files_key(p for pair in pairs for p in pair))
    return _cached_dataset(_cityscapes_generator, {"pairs": pairs}, features, key, cache_dir)


# ------------------------------------------------------------------------------------------ COCO outliers
# The Cityscapes classes that also exist in COCO; images showing any of them are not outliers.
COCO_EXCLUDED_CATEGORIES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "bus", "truck", "traffic light", "stop sign")


def annotation_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Mask (bool (height, width)) of one COCO annotation, rasterised by `pycocotools.mask` (as the official
    outlier preparation and detectron2 do): a list of polygons (the union of its parts), or an RLE with
    uncompressed (``counts`` a list, crowd annotations) or compressed (``counts`` a string) run lengths."""
    if isinstance(segmentation, dict):
        size = [int(v) for v in segmentation.get("size", ())]
        if size != [height, width]:
            raise ValueError(f"COCO RLE of size {size} does not match its image size {[height, width]}")
        counts = segmentation.get("counts")
        if isinstance(counts, list):
            if sum(int(c) for c in counts) != height * width:
                raise ValueError(f"COCO RLE runs sum to {sum(int(c) for c in counts)}, expected height*width = "
                                 f"{height}*{width}")
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
        else:
            raise ValueError(f"COCO RLE counts must be a list or a string, got {type(counts).__name__}")
        try:
            return mask_utils.decode(rle).astype(bool)
        except ValueError as error:
            raise ValueError(f"COCO RLE {counts!r}: {error}") from None
    polygons = [[float(v) for v in polygon] for polygon in segmentation if len(polygon) >= 6]  # >= three points
    if not polygons:
        return np.zeros((height, width), bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)


def coco_outlier_items(annotation_file: str, image_dir: str, min_size: int = 480, keep_empty: bool = False
                       ) -> list[tuple[str, int, int, list]]:
    """Select COCO images for outlier exposure: (image path, height, width, segmentations).

    Keeps images that contain no instance of `COCO_EXCLUDED_CATEGORIES`, have both sides >= `min_size` and
    exist in `image_dir`. The official preparation also keeps images without any annotation (their mask is
    empty, so pasting them pastes nothing); `keep_empty=False` drops them instead.
    """
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"COCO instances annotation file not found: {annotation_file!r}")
    _require_dir(image_dir, "COCO images")
    with open(annotation_file) as handle:
        coco = json.load(handle)
    for field in ("images", "annotations", "categories"):
        if field not in coco:
            raise ValueError(f"{annotation_file!r} is not a COCO instances file: no {field!r} field")
    names = {c["id"]: c["name"] for c in coco["categories"]}
    excluded = {cid for cid, name in names.items() if name in COCO_EXCLUDED_CATEGORIES}
    by_image: dict[int, list] = {}
    banned: set[int] = set()
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["segmentation"])
        if ann["category_id"] in excluded:
            banned.add(ann["image_id"])
    items, missing = [], 0
    for image in sorted(coco["images"], key=lambda im: im["id"]):
        height, width = int(image["height"]), int(image["width"])
        if image["id"] in banned or height < min_size or width < min_size:
            continue
        segmentations = by_image.get(image["id"], [])
        if not segmentations and not keep_empty:
            continue
        path = os.path.join(image_dir, image["file_name"])
        if not os.path.isfile(path):
            missing += 1  # a partial download: the official preparation lists the image folder, so skip too
            continue
        items.append((path, height, width, segmentations))
    if missing:
        logger.warning(f"{missing} selected COCO images are listed in {annotation_file} but absent from {image_dir}")
    if not items:
        raise ValueError(f"no COCO image in {image_dir!r} qualifies as an outlier source (min_size={min_size}, "
                         f"excluding {', '.join(COCO_EXCLUDED_CATEGORIES)})")
    return items


def _coco_generator(items: Sequence[tuple[str, int, int, list]]) -> Iterator[dict]:
    for path, height, width, segmentations in items:
        mask = np.zeros((height, width), bool)
        for segmentation in segmentations:
            mask |= annotation_mask(segmentation, height, width)
        yield {"image": path, OUTLIER_MASK_COLUMN: Image.fromarray(mask.astype(np.uint8))}


def coco_outlier_dataset(root: str, split: str = "train2017", min_size: int = 480, keep_empty: bool = False,
                         cache_dir: str | None = None) -> datasets.Dataset:
    """COCO outlier-exposure source: ``image`` and ``mask`` (uint8 0/1, union of the image's instances).

    Layout: ``root/annotations/instances_{split}.json`` and ``root/{split}/*.jpg``.
    """
    annotation_file = os.path.join(root, "annotations", f"instances_{split}.json")
    image_dir = os.path.join(root, split)
    items = coco_outlier_items(annotation_file, image_dir, min_size, keep_empty)
    logger.info(f"COCO {split}: {len(items)} outlier images")
    features = datasets.Features({"image": datasets.Image(), OUTLIER_MASK_COLUMN: datasets.Image()})
    key = ("coco-outliers-v1", _files_key([annotation_file]), min_size, keep_empty, [item[0] for item in items])
    return _cached_dataset(_coco_generator, {"items": items}, features, key, cache_dir)


# ------------------------------------------------------------------------------------- generic folders
def paired_folder_dataset(root: str, image_dir: str = "images", label_dir: str = "masks",
                          label_column: str = OUTLIER_MASK_COLUMN) -> datasets.Dataset:
    """Images in ``root/image_dir`` with same-stem PNGs in ``root/label_dir``, read lazily by path.

    The defaults read an outlier source (``images/`` + ``masks/``, nonzero mask = outlier);
    ``label_dir="labels", label_column="label"`` reads a SynthRoad split written by ``mask2anomaly-synthroad``.
    """
    images_path, labels_path = os.path.join(root, image_dir), os.path.join(root, label_dir)
    _require_dir(images_path, "image folder")
    _require_dir(labels_path, f"{label_column} folder")
    images, labels = [], []
    for name in sorted(os.listdir(images_path)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS or name.startswith("."):
            continue
        label_path = os.path.join(labels_path, f"{stem}.png")
        if not os.path.isfile(label_path):
            raise FileNotFoundError(f"image {os.path.join(images_path, name)!r} has no {label_column}: "
                                    f"expected {label_path!r}")
        images.append(os.path.join(images_path, name))
        labels.append(label_path)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {images_path!r}")
    features = datasets.Features({"image": datasets.Image(), label_column: datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, label_column: labels}, features=features)


def synthroad_outlier_dataset(num: int, seed: int = 0, height: int = 256, width: int = 512,
                              cache_dir: str | None = None) -> datasets.Dataset:
    """SynthRoad's ``outliers`` split as an outlier source (``image``, ``mask`` 0/1)."""
    dataset = synthroad_dataset("outliers", num, seed=seed, height=height, width=width, cache_dir=cache_dir)
    return dataset.rename_column("label", OUTLIER_MASK_COLUMN)
