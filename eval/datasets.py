"""The benchmark-reader registry: for each anomaly-segmentation benchmark's local folder, (image path, label map)
pairs with labels 0 = inlier, 1 = anomaly, 255 = void, whatever the dataset's own convention.

``get_benchmark(name, data_dir)`` returns an :class:`AnomalyBenchmark` that lists the labelled images at once (a
missing folder or an empty dataset raises with the path and the expected layout) and reads a label map each time a
frame is iterated; it is a sequence of samples that the evaluation loop (`mask2anomaly_eval.loop.evaluate`) takes
directly, from the benchmark runner as from training-time validation. Supported names: ``smiyc_ra21``,
``smiyc_ro21``, ``fs_lostandfound``, ``fs_static``, ``road_anomaly``, ``streethazards``, ``synthroad``.

Adding a benchmark = one :class:`BenchmarkReader` entry in :data:`BENCHMARKS` (its name, title, layout, pair
finder, label convention, default track) and a test that builds a small tree in its real layout.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from transformers.utils import logging

from mask2anomaly_training.synthroad.labels import METADATA_NAME
from modeling_mask2anomaly.image_processing_mask2anomaly import IMAGE_EXTENSIONS

from .io import read_label_png
from .metrics import Track

logger = logging.get_logger(__name__)

VOID = 255

# Official `ObstacleTrack-validation` split (road_anomaly_benchmark/datasets/tracks.py): frames of the `validation`
# scene whose id starts with one of these prefixes are excluded (str.startswith, as there).
SMIYC_RO21_EXCLUDED_PREFIXES = (
    "validation_19",
    "validation_21",
    "validation_22",
    "validation_23",
    "validation_24",
    "validation_25",
    "validation_26",
    "validation_27",
    "validation_28",
    "validation_29",
)


class BenchmarkFrame(NamedTuple):
    """One labelled image: its path and its label map (uint8, 0 inlier / 1 anomaly / 255 void)."""

    image_path: Path
    labels: np.ndarray


def _lookup(path: Path, raw: np.ndarray, mapping: dict[int, int], default: int | None) -> np.ndarray:
    """Map raw label values through ``mapping``; values not in it become ``default`` or raise when it is None."""
    if raw.size and raw.min() < 0:
        raise ValueError(f"label image {path} has negative values; expected {sorted(mapping)}")
    size = max(mapping) + 1
    table = np.full(size + 1, -1, np.int64)  # last slot: every value beyond the mapping
    for source, target in mapping.items():
        table[source] = target
    labels = table[np.minimum(raw.astype(np.int64, copy=False), size)]
    unknown = labels < 0
    if unknown.any():
        if default is None:
            bad = np.unique(raw[unknown])
            raise ValueError(
                f"label image {path} contains the value(s) {bad[:10].tolist()}; expected only {sorted(mapping)}"
            )
        labels[unknown] = default
    return labels.astype(np.uint8)


def smiyc_labels(raw: np.ndarray, path: Path) -> np.ndarray:
    """SegmentMeIfYouCan ``*_labels_semantic.png``: 0 = not anomaly (RA21) / road (RO21), 1 = anomaly / obstacle,
    255 = void; any other value is void, like the official reader (``DatasetRA.get_frame`` starts from 255)."""
    return _lookup(path, raw, {0: 0, 1: 1}, default=VOID)


def binary_void_labels(raw: np.ndarray, path: Path) -> np.ndarray:
    """Labels already in 0 / 1 / 255 (Fishyscapes as distributed by the method repos, SynthRoad); other values
    raise, since they would mean a different convention."""
    return _lookup(path, raw, {0: 0, 1: 1, VOID: VOID}, default=None)


def road_anomaly_labels(raw: np.ndarray, path: Path) -> np.ndarray:
    """Road Anomaly (Lis et al. 2019): 0 = not anomaly, 2 = anomaly in the original ``labels_semantic.png`` (the
    Mask2Anomaly script maps 2 -> 1); method repos' copies already use 1. 255 (if present) is void; no other value
    is expected."""
    return _lookup(path, raw, {0: 0, 1: 1, 2: 1, VOID: VOID}, default=None)


def streethazards_labels(raw: np.ndarray, path: Path) -> np.ndarray:
    """StreetHazards annotations (values 1..14): 14 = anomaly; 1 (unlabeled) and 4 (other) are ignored (255); the
    other classes (< 14) are inliers, as in Mask2Anomaly's ``anomaly_inference_streethazard.py``. Anything else
    (never present in the release) is void."""
    mapping = {value: 0 for value in range(14)}
    mapping.update({1: VOID, 4: VOID, 14: 1})
    return _lookup(path, raw, mapping, default=VOID)


@dataclass
class AnomalyBenchmark:
    """The labelled images of a benchmark folder; iterating yields :class:`BenchmarkFrame` (label read lazily).

    ``track`` is the component-metric track the benchmark is evaluated with (``"obstacle"`` for RoadObstacle21);
    ``split`` the split the folder holds, for benchmarks with several (SynthRoad's ``anomaly`` / ``obstacle``).
    """

    name: str
    data_dir: Path
    track: Track
    pairs: list[tuple[Path, Path]]
    convert: Callable[[np.ndarray, Path], np.ndarray]
    skip_without_anomaly: bool = False
    # images of the folder left out because they have no label file (reported, never evaluated)
    unlabelled: list[Path] = field(default_factory=list)
    split: str | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def image_paths(self) -> list[Path]:
        return [image for image, _ in self.pairs]

    def read_labels(self, index: int) -> np.ndarray:
        label_path = self.pairs[index][1]
        return self.convert(read_label_png(label_path), label_path)

    def __getitem__(self, index: int) -> BenchmarkFrame:
        return BenchmarkFrame(self.pairs[index][0], self.read_labels(index))

    def __iter__(self) -> Iterator[BenchmarkFrame]:
        for index in range(len(self.pairs)):
            frame = self[index]
            if self.skip_without_anomaly and not (frame.labels == 1).any():
                continue
            yield frame


@dataclass(frozen=True)
class BenchmarkReader:
    """One registry entry: how a benchmark's folder is laid out and read.

    Attributes:
        name: the key of :data:`BENCHMARKS` and the ``--benchmark`` value.
        title: how results tables and model cards name it.
        description: the expected folder layout and label values (quoted in every error about the folder).
        find: ``root -> [(image path, label path or None)]`` in a stable order (None: no label file); raises
            ``FileNotFoundError`` for a missing folder.
        labels: the label convention, ``(raw label array, label path) -> uint8 0 / 1 / 255``.
        track: the component-metric track it is evaluated with (size thresholds).
        skip_without_anomaly: the benchmark leaves out frames without anomaly pixels (StreetHazards).
        split_of: ``root -> split name or None``, for a benchmark whose folders hold one of several splits
            (SynthRoad); the split names the results and may imply the track (`split_tracks`).
        split_tracks: the track of a split, where it is not `track`.
    """

    name: str
    title: str
    description: str
    find: Callable[[Path], list[tuple[Path, Path | None]]]
    labels: Callable[[np.ndarray, Path], np.ndarray]
    track: Track = "anomaly"
    skip_without_anomaly: bool = False
    split_of: Callable[[Path], str | None] | None = None
    split_tracks: Mapping[str, Track] = field(default_factory=dict)


def _synthroad_split(root: Path) -> str | None:
    """The split a SynthRoad folder holds: from its `METADATA_NAME` file, else its name when that is a test
    split (``data/synthroad/obstacle``), else None."""
    metadata = root / METADATA_NAME
    if metadata.is_file():
        try:
            split = json.loads(metadata.read_text(encoding="utf-8")).get("split")
        except (OSError, ValueError, AttributeError) as err:
            raise FileNotFoundError(f"{metadata} is not the JSON object mask2anomaly-synthroad writes ({err})") from None
        if isinstance(split, str):
            return split
    return root.name if root.name in ("anomaly", "obstacle") else None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _first_existing(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / name for name in names if (root / name).is_dir()), None)


def _paired_folders(
    image_dirs: tuple[str, ...], label_dirs: tuple[str, ...], label_names: tuple[str, ...] = ("{stem}.png",)
) -> Callable[[Path], list[tuple[Path, Path]]]:
    """Pairs (image, label) from sibling folders; an image without a label file comes with ``None`` (an unlabelled
    test frame, or a label that is missing: `get_benchmark` leaves it out and lists it in ``unlabelled``)."""

    def find(root: Path) -> list[tuple[Path, Path | None]]:
        image_dir, label_dir = _first_existing(root, image_dirs), _first_existing(root, label_dirs)
        if image_dir is None or label_dir is None:
            missing = " or ".join(str(root / n) for n in (image_dirs if image_dir is None else label_dirs))
            raise FileNotFoundError(f"missing folder {missing}")
        return [(image, next((label_dir / n.format(stem=image.stem) for n in label_names
                              if (label_dir / n.format(stem=image.stem)).is_file()), None))
                for image in _images_in(image_dir)]

    return find


def _smiyc_ro21(root: Path) -> list[tuple[Path, Path | None]]:
    pairs = _paired_folders(("images",), ("labels_masks",), ("{stem}_labels_semantic.png", "{stem}.png"))(root)
    kept = [(image, label) for image, label in pairs if not image.stem.startswith(SMIYC_RO21_EXCLUDED_PREFIXES)]
    if len(kept) != len(pairs):
        logger.info(f"{root}: {len(pairs) - len(kept)} frame(s) excluded as in the official ObstacleTrack-validation")
    return kept


def _streethazards(root: Path) -> list[tuple[Path, Path | None]]:
    if (root / "images" / "test").is_dir():
        image_root, label_root = root / "images" / "test", root / "annotations" / "test"
        if not label_root.is_dir():
            raise FileNotFoundError(f"missing folder {label_root}")
        pairs = []
        for town in sorted(p for p in image_root.iterdir() if p.is_dir()):
            for image in _images_in(town):
                label = label_root / town.name / f"{image.stem}.png"
                if not label.is_file():
                    raise FileNotFoundError(f"missing annotation {label} for image {image}")
                pairs.append((image, label))
        return pairs
    # Flat copy used by Mask2Anomaly's script: images/*.png with labels/*.png.
    return _paired_folders(("images",), ("labels", "annotations"))(root)


_SMIYC_LABELS = ("{stem}_labels_semantic.png", "{stem}.png")

BENCHMARKS: dict[str, BenchmarkReader] = {reader.name: reader for reader in (
    BenchmarkReader(
        "smiyc_ra21", "SMIYC RoadAnomaly21 (validation)",
        "SegmentMeIfYouCan RoadAnomaly21 (validation): DIR/images/<id>.jpg (or .png/.webp) and "
        "DIR/labels_masks/<id>_labels_semantic.png (or <id>.png); 0 not anomaly, 1 anomaly, 255 void",
        _paired_folders(("images",), ("labels_masks",), _SMIYC_LABELS), smiyc_labels,
    ),
    BenchmarkReader(
        "smiyc_ro21", "SMIYC RoadObstacle21 (validation)",
        "SegmentMeIfYouCan RoadObstacle21 (validation): DIR/images/<id>.webp (or .jpg/.png) and "
        "DIR/labels_masks/<id>_labels_semantic.png (or <id>.png); 0 road, 1 obstacle, 255 void (off-road)",
        _smiyc_ro21, smiyc_labels, track="obstacle",
    ),
    BenchmarkReader(
        "fs_lostandfound", "Fishyscapes Lost & Found (validation)",
        "Fishyscapes Lost & Found (validation, method-repo copy): DIR/images/<id>.png (or DIR/original/) and "
        "DIR/labels_masks/<id>.png (or DIR/labels/); 0 inlier, 1 anomaly, 255 void",
        _paired_folders(("images", "original"), ("labels_masks", "labels")), binary_void_labels,
    ),
    BenchmarkReader(
        "fs_static", "Fishyscapes Static (validation)",
        "Fishyscapes Static (validation, method-repo copy): DIR/images/<id>.jpg (or DIR/original/) and "
        "DIR/labels_masks/<id>.png (or DIR/labels/); 0 inlier, 1 anomaly, 255 void",
        _paired_folders(("images", "original"), ("labels_masks", "labels")), binary_void_labels,
    ),
    BenchmarkReader(
        "road_anomaly", "Road Anomaly",
        "Road Anomaly (method-repo copy): DIR/images/<id>.jpg (or DIR/original/) and DIR/labels/<id>.png (or "
        "DIR/labels_masks/); 0 not anomaly, 1 or 2 anomaly",
        _paired_folders(("images", "original"), ("labels", "labels_masks")), road_anomaly_labels,
    ),
    BenchmarkReader(
        "streethazards", "StreetHazards (test)",
        "StreetHazards (test split): DIR/images/test/t5/<id>.png and DIR/annotations/test/t5/<id>.png (DIR = the "
        "extracted 'test' folder); 14 anomaly, 1 and 4 ignored, other classes inlier; images without anomaly are "
        "skipped",
        _streethazards, streethazards_labels, skip_without_anomaly=True,
    ),
    BenchmarkReader(
        "synthroad", "SynthRoad",
        "SynthRoad (this project's synthetic set): DIR/images/<stem>.png and DIR/labels/<stem>.png; 0 inlier, "
        "1 anomaly, 255 void",
        _paired_folders(("images",), ("labels",)), binary_void_labels,
        split_of=_synthroad_split, split_tracks={"obstacle": "obstacle"},
    ),
)}


def get_benchmark(name: str, data_dir: str | Path, track: Track | None = None) -> AnomalyBenchmark:
    """The labelled images of benchmark ``name`` in ``data_dir`` (layouts in :data:`BENCHMARKS`).

    ``track`` overrides the benchmark's component-metric track, which is the split's where the folder holds a split
    with its own track (SynthRoad's obstacle split: ``"obstacle"``).
    Raises ``ValueError`` for an unknown name and ``FileNotFoundError`` naming the path and the expected layout when
    a folder is missing or holds no labelled image.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    layout = BENCHMARKS[name]
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: data folder {root} does not exist; expected layout: {layout.description}")
    try:
        found = layout.find(root)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{name}: {error}; expected layout: {layout.description}") from None
    pairs = [(image, label) for image, label in found if label is not None]
    unlabelled = [image for image, label in found if label is None]
    if unlabelled:
        logger.warning(f"{name}: {len(unlabelled)} image(s) in {root} without a label file left out (unlabelled "
                       f"test frames, or missing labels), e.g. {unlabelled[0]}")
    if not pairs:
        raise FileNotFoundError(f"{name}: no labelled image found in {root}; expected layout: {layout.description}")
    split = layout.split_of(root) if layout.split_of is not None else None
    return AnomalyBenchmark(
        name=name,
        data_dir=root,
        track=track or layout.split_tracks.get(split or "", layout.track),
        split=split,
        pairs=pairs,
        convert=layout.labels,
        skip_without_anomaly=layout.skip_without_anomaly,
        unlabelled=unlabelled,
    )
