"""Submission formats of the two hidden-test-set benchmarks: writers and readers of the files they take.

SegmentMeIfYouCan (the ``road-anomaly-benchmark`` kit)
    The kit evaluates a method from one HDF5 file per frame, written by its ``Evaluation.save_output``:
    ``<DIR_OUTPUTS>/anomaly_p/<method>/<dataset>/<frame id>.hdf5`` holding the (H, W) anomaly scores as **float16**
    in a dataset named ``value``, compressed with **gzip level 9** (the kit's ``ChannelLoaderHDF5(...,
    compression=9)``). ``<dataset>`` is the name the kit *persists* a frame under (its ``dset_name``), which for
    the split datasets is the parent dataset's: ``AnomalyTrack-test`` frames go to ``AnomalyTrack-all/``,
    ``ObstacleTrack-test`` frames to ``ObstacleTrack-all/``, ``LostAndFound-testNoKnown`` frames to
    ``LostAndFound-test/`` (:data:`SMIYC_DATASETS`). The frame id is the image file's stem, without the
    ``_leftImg8bit`` suffix for Lost & Found (:func:`smiyc_frame_id`). `write_smiyc_frame` writes one file,
    `read_smiyc_frame` reads one back (``h5py``, from the ``[eval]`` extra).

Fishyscapes (the container interface)
    The container reads ``/input/DDDD_*.png`` and writes, per input, ``/output/DDDD_anomaly.npy`` (float32 per pixel,
    the input's resolution) and ``/output/DDDD_segmentation.npy`` (integer class ids, same size), with ``DDDD`` the
    part of the input name before the first underscore (:func:`fishyscapes_frame_id`,
    `write_fishyscapes_frame`).

`mask2anomaly-predict --format smiyc|fishyscapes` writes these trees for a folder of frames (`SubmissionWriter`).
Every file is written to a temporary name beside its target and renamed into place, so an interrupted run leaves no
partial file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from modeling_mask2anomaly.atomic_io import write_atomically

SubmissionFormat = Literal["smiyc", "fishyscapes"]
SUBMISSION_FORMATS: tuple[str, ...] = ("smiyc", "fishyscapes")

# ------------------------------------------------------------------------------------------------ SegmentMeIfYouCan

# The kit's `Evaluation.channels['anomaly_p']`: path template, dataset key, dtype and gzip level.
SMIYC_PATH_TEMPLATE = "anomaly_p/{method}/{dataset}/{frame_id}.hdf5"
SMIYC_DATASET_KEY = "value"
SMIYC_DTYPE = np.float16
SMIYC_GZIP_LEVEL = 9


@dataclass(frozen=True)
class SmiycDataset:
    """A dataset of the SMIYC kit: the folder name its frames are persisted under, how a frame id is formed from
    the image file name, and the number of frames the kit expects (``expected_length``; None where it sets none)."""

    name: str
    persisted_as: str
    image_suffix: str = ""  # removed from the file stem to get the frame id (Lost & Found's "_leftImg8bit")
    expected_frames: int | None = None


# From road_anomaly_benchmark/datasets/{tracks.py, tracks_extra.py}: a split dataset that reads its frames through
# a parent dataset (`RoadAnomalyByClass.base_ds`, `name_for_persistence`) persists them under the parent's name.
SMIYC_DATASETS: dict[str, SmiycDataset] = {dataset.name: dataset for dataset in (
    SmiycDataset("AnomalyTrack-test", "AnomalyTrack-all", expected_frames=100),
    SmiycDataset("AnomalyTrack-validation", "AnomalyTrack-all", expected_frames=10),
    SmiycDataset("AnomalyTrack-all", "AnomalyTrack-all", expected_frames=110),
    SmiycDataset("ObstacleTrack-test", "ObstacleTrack-all", expected_frames=327),
    SmiycDataset("ObstacleTrack-validation", "ObstacleTrack-all", expected_frames=30),
    SmiycDataset("ObstacleTrack-all", "ObstacleTrack-all"),
    SmiycDataset("ObstacleTrack-night", "ObstacleTrack-all", expected_frames=30),
    SmiycDataset("ObstacleTrack-snowstorm", "ObstacleTrack-all", expected_frames=55),
    SmiycDataset("LostAndFound-test", "LostAndFound-test", "_leftImg8bit", expected_frames=1203),
    SmiycDataset("LostAndFound-testNoKnown", "LostAndFound-test", "_leftImg8bit", expected_frames=1043),
    SmiycDataset("LostAndFound-testValid", "LostAndFound-test", "_leftImg8bit", expected_frames=1186),
)}


def get_smiyc_dataset(name: str) -> SmiycDataset:
    """The kit's dataset ``name``; ValueError naming the value and the choices otherwise."""
    if name not in SMIYC_DATASETS:
        raise ValueError(f"SMIYC dataset {name!r} is not one of {', '.join(SMIYC_DATASETS)}")
    return SMIYC_DATASETS[name]


def smiyc_frame_id(image_path: str | os.PathLike, dataset: str) -> str:
    """The kit's frame id of an image file: its stem (``images/<fid>.jpg`` / ``.webp``), without the
    ``_leftImg8bit`` suffix for Lost & Found (``leftImg8bit/test/<scene>/<fid>_leftImg8bit.png``)."""
    spec = get_smiyc_dataset(dataset)
    stem = Path(image_path).stem
    if spec.image_suffix:
        if not stem.endswith(spec.image_suffix):
            raise ValueError(f"{image_path}: a {dataset} image is named <frame id>{spec.image_suffix}.<ext>; "
                             f"this name does not end with {spec.image_suffix!r}")
        stem = stem[: -len(spec.image_suffix)]
    return stem


def smiyc_output_path(output_root: str | os.PathLike, method: str, dataset: str, frame_id: str) -> Path:
    """``<output_root>/anomaly_p/<method>/<persisted dataset>/<frame_id>.hdf5`` (``output_root`` = the kit's
    ``DIR_OUTPUTS``)."""
    if not method or "/" in method or method in (".", ".."):
        raise ValueError(f"SMIYC method name {method!r}: expected a non-empty name without '/'")
    return Path(output_root) / SMIYC_PATH_TEMPLATE.format(
        method=method, dataset=get_smiyc_dataset(dataset).persisted_as, frame_id=frame_id)


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("the SegmentMeIfYouCan format needs h5py: pip install 'mask2anomaly[eval]'") from None
    return h5py


def _check_map(anomaly_map: np.ndarray, what: str) -> np.ndarray:
    anomaly_map = np.asarray(anomaly_map)
    if anomaly_map.ndim != 2 or anomaly_map.size == 0:
        raise ValueError(f"{what}: anomaly map has shape {anomaly_map.shape}; expected a non-empty (H, W) array")
    if anomaly_map.dtype.kind not in "fiu":
        raise ValueError(f"{what}: anomaly map has dtype {anomaly_map.dtype}; expected real scores")
    return anomaly_map


def write_smiyc_frame(output_root: str | os.PathLike, method: str, dataset: str, frame_id: str,
                      anomaly_map: np.ndarray) -> Path:
    """Write one frame's (H, W) anomaly scores as the kit's ``save_output`` does (float16, dataset ``value``,
    gzip 9) to `smiyc_output_path`; returns the path. Scores beyond float16's range (±65504) raise, since the kit
    would store them as infinities."""
    path = smiyc_output_path(output_root, method, dataset, frame_id)
    anomaly_map = _check_map(anomaly_map, os.fspath(path))
    largest = float(np.abs(anomaly_map).max())
    if math.isfinite(largest) and largest > float(np.finfo(SMIYC_DTYPE).max):
        raise ValueError(f"{path}: scores reach {largest:g}, beyond float16's range (65504) that SMIYC stores; "
                         "expected scores a float16 can hold (rescale them)")
    value = anomaly_map.astype(SMIYC_DTYPE)
    h5py = _h5py()
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(stream) -> None:
        with h5py.File(stream, "w") as handle:
            handle.create_dataset(SMIYC_DATASET_KEY, data=value, compression=SMIYC_GZIP_LEVEL)

    write_atomically(path, write)
    return path


def read_smiyc_frame(path: str | os.PathLike) -> np.ndarray:
    """The (H, W) float16 scores of one SMIYC output file (the kit's ``ChannelLoaderHDF5.read_file``)."""
    h5py = _h5py()
    try:
        with h5py.File(os.fspath(path), "r") as handle:
            if SMIYC_DATASET_KEY not in handle:
                raise ValueError(f"{path}: no {SMIYC_DATASET_KEY!r} dataset (keys {list(handle.keys())}); expected "
                                 "a file written by Evaluation.save_output")
            return handle[SMIYC_DATASET_KEY][()]
    except OSError as err:
        raise ValueError(f"cannot read SMIYC output {path}: {err}") from None


def check_smiyc_frame_count(dataset: str, num_frames: int) -> str | None:
    """A warning when the number of frames differs from what the kit expects for ``dataset``, else None."""
    expected = get_smiyc_dataset(dataset).expected_frames
    if expected is not None and num_frames != expected:
        return (f"{dataset}: wrote {num_frames} frame(s) but the kit expects {expected}; its evaluation reads "
                "every frame of the dataset")
    return None


# ------------------------------------------------------------------------------------------------ Fishyscapes

FISHYSCAPES_INPUT_PATTERN = re.compile(r"^(\d{4})_.*\.png$", re.IGNORECASE)
FISHYSCAPES_SUFFIXES: tuple[str, str] = ("_anomaly.npy", "_segmentation.npy")


def fishyscapes_frame_id(image_path: str | os.PathLike) -> str:
    """``DDDD`` of an input named ``DDDD_*.png`` (the container's input convention); ValueError otherwise."""
    name = Path(image_path).name
    match = FISHYSCAPES_INPUT_PATTERN.match(name)
    if match is None:
        raise ValueError(f"{image_path}: Fishyscapes inputs are named DDDD_*.png (four digits, an underscore); "
                         f"got {name!r}")
    return match.group(1)


def write_fishyscapes_frame(output_dir: str | os.PathLike, frame_id: str, anomaly_map: np.ndarray,
                            semantic_map: np.ndarray) -> tuple[Path, Path]:
    """Write ``DDDD_anomaly.npy`` ((H, W) float32) and ``DDDD_segmentation.npy`` ((H, W) integer class ids) into
    ``output_dir``; returns both paths."""
    output_dir = Path(output_dir)
    if not re.fullmatch(r"\d{4}", frame_id):
        raise ValueError(f"Fishyscapes frame id {frame_id!r}: expected four digits")
    anomaly = np.ascontiguousarray(_check_map(anomaly_map, frame_id), dtype=np.float32)
    semantic = np.asarray(semantic_map)
    if semantic.shape != anomaly.shape or semantic.dtype.kind not in "iu":
        raise ValueError(f"{frame_id}: segmentation has shape {semantic.shape} and dtype {semantic.dtype}; expected "
                         f"integer class ids of the anomaly map's shape {anomaly.shape}")
    semantic = np.ascontiguousarray(semantic)
    paths = (output_dir / f"{frame_id}{FISHYSCAPES_SUFFIXES[0]}", output_dir / f"{frame_id}{FISHYSCAPES_SUFFIXES[1]}")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(paths[0], lambda f: np.save(f, anomaly, allow_pickle=False))
    write_atomically(paths[1], lambda f: np.save(f, semantic, allow_pickle=False))
    return paths


# ------------------------------------------------------------------------------------------------ the predict CLI


class SubmissionWriter:
    """What `mask2anomaly-predict --format smiyc|fishyscapes` writes: picks the inputs the format accepts and
    writes each prediction in the format's layout under ``output_dir``.

    Args:
        format: ``"smiyc"`` (``output_dir`` is the kit's ``DIR_OUTPUTS``; needs ``method`` and ``dataset``) or
            ``"fishyscapes"`` (``output_dir`` is the container's ``/output``).
    """

    def __init__(self, format: SubmissionFormat, output_dir: str | os.PathLike, method: str | None = None,
                 dataset: str | None = None) -> None:
        if format not in SUBMISSION_FORMATS:
            raise ValueError(f"--format {format!r}: expected one of {', '.join(SUBMISSION_FORMATS)}")
        if format == "smiyc":
            if not method or not dataset:
                raise ValueError("--format smiyc needs --method NAME and --dataset NAME (one of "
                                 f"{', '.join(SMIYC_DATASETS)})")
            get_smiyc_dataset(dataset)
            smiyc_output_path(output_dir, method, dataset, "x")  # checks the method name
            _h5py()
        self.format, self.output_dir, self.method, self.dataset = format, Path(output_dir), method, dataset
        self.num_written = 0

    def frame_id(self, image_path: str | os.PathLike) -> str:
        if self.format == "fishyscapes":
            return fishyscapes_frame_id(image_path)
        return smiyc_frame_id(image_path, self.dataset)  # type: ignore[arg-type]

    def select(self, paths: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
        """The inputs whose names give a frame id, each id once; one problem line per other input."""
        kept: list[Path] = []
        problems: list[str] = []
        seen: dict[str, Path] = {}
        for path in map(Path, paths):
            try:
                frame_id = self.frame_id(path)
            except ValueError as err:
                problems.append(str(err))
                continue
            if frame_id in seen:
                problems.append(f"{path}: frame {frame_id} was already given by {seen[frame_id]}; expected one "
                                "input per frame")
                continue
            seen[frame_id] = path
            kept.append(path)
        return kept, problems

    def write(self, image_path: str | os.PathLike, anomaly_map: np.ndarray, semantic_map: np.ndarray) -> list[Path]:
        """Write one prediction ((H, W) anomaly scores and class ids at the input's size); returns the paths."""
        frame_id = self.frame_id(image_path)
        if self.format == "fishyscapes":
            paths = list(write_fishyscapes_frame(self.output_dir, frame_id, anomaly_map, semantic_map))
        else:
            paths = [write_smiyc_frame(self.output_dir, self.method, self.dataset, frame_id,  # type: ignore[arg-type]
                                       anomaly_map)]
        self.num_written += 1
        return paths

    def warnings(self) -> list[str]:
        """What to tell the user at the end (a frame count the SMIYC kit will not accept)."""
        if self.format == "smiyc":
            warning = check_smiyc_frame_count(self.dataset, self.num_written)  # type: ignore[arg-type]
            return [warning] if warning else []
        return []


__all__ = [
    "FISHYSCAPES_SUFFIXES",
    "SMIYC_DATASETS",
    "SMIYC_DATASET_KEY",
    "SMIYC_GZIP_LEVEL",
    "SUBMISSION_FORMATS",
    "SmiycDataset",
    "SubmissionWriter",
    "SubmissionFormat",
    "check_smiyc_frame_count",
    "fishyscapes_frame_id",
    "get_smiyc_dataset",
    "read_smiyc_frame",
    "smiyc_frame_id",
    "smiyc_output_path",
    "write_fishyscapes_frame",
    "write_smiyc_frame",
]
