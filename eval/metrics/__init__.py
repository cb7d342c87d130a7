"""Anomaly-segmentation metrics for Mask2Anomaly: the one entry point the benchmark runner, training's periodic
evaluation and the ``evaluate`` module use.

* :class:`PixelMetricAccumulator` (``pixel.py``): AuPRC, FPR95, AUROC, best F1 on pooled non-void pixels,
  ``mode="exact"`` (``exact.py``: scikit-learn values) or ``"smiyc"`` / ``"smiyc_uniform"`` (``smiyc.py``:
  SegmentMeIfYouCan's binned curves).
* :class:`ComponentMetricAccumulator` (``components.py``): SegmentMeIfYouCan's sIoU, PPV and mean F1 (the only
  module that needs scipy, imported when a frame is scored).
* ``common.py``: the label convention (0 / 1 / 255 void) and the input checks every metric shares.
* :func:`compute_metrics`: everything for in-memory lists of score maps and label maps.
* :func:`evaluate_two_pass`: pixel curve first, then components at its best-F1 threshold, for frames that can be
  produced twice (e.g. read from disk), so that nothing is held in memory.

Distributed use (``accelerate``): every process accumulates its own shard, then
``accs = accelerator.gather_object([acc])`` (accumulators pickle) or a gather of ``acc.state_dict()`` (numpy arrays
only), and ``merge_accumulators(accs)`` on the main process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from tqdm.auto import tqdm
from transformers.utils import logging

from .common import VOID_LABEL, check_frame, check_labels, to_numpy
from .components import (
    SIOU_THRESHOLDS,
    TRACK_SIZE_THRESHOLDS,
    ComponentMetricAccumulator,
    FrameComponentStats,
    Track,
    frame_component_stats,
)
from .pixel import PIXEL_MODES, PixelMetricAccumulator, PixelMode

logger = logging.get_logger(__name__)

__all__ = [
    "PIXEL_MODES",
    "SIOU_THRESHOLDS",
    "TRACK_SIZE_THRESHOLDS",
    "VOID_LABEL",
    "ComponentMetricAccumulator",
    "FrameComponentStats",
    "PixelMetricAccumulator",
    "PixelMode",
    "Track",
    "check_frame",
    "check_labels",
    "compute_metrics",
    "evaluate_two_pass",
    "frame_component_stats",
    "merge_accumulators",
    "to_numpy",
]

Frames = Iterable[tuple[Any, Any]]
AccumulatorT = TypeVar("AccumulatorT", PixelMetricAccumulator, ComponentMetricAccumulator)


def merge_accumulators(accumulators: Sequence[AccumulatorT]) -> AccumulatorT:
    """Merge accumulators gathered from several processes into the first one (returned)."""
    if not accumulators:
        raise ValueError("no accumulator to merge; expected at least one")
    merged = accumulators[0]
    for other in accumulators[1:]:
        merged.merge(other)
    return merged


def _component_threshold(pixel_result: dict[str, Any]) -> float:
    threshold = pixel_result["best_f1_threshold"]
    if threshold is None or math.isnan(threshold):
        raise ValueError(
            "the pixel curve has no best-F1 threshold (no anomaly pixel in the data?); pass component_threshold="
        )
    return float(threshold)


def evaluate_two_pass(
    frames: Callable[[], Frames],
    *,
    mode: PixelMode = "exact",
    components: bool = True,
    track: Track = "anomaly",
    component_threshold: float | None = None,
    cast_float16: bool = False,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, Any]:
    """Pixel metrics, then (``components=True``) component metrics at the pixel curve's best-F1 threshold.

    Args:
        frames: called once per pass; returns an iterable of ``(scores, labels)`` pairs, the same each time.
        mode: pixel curve, see :class:`PixelMetricAccumulator`. Its ``best_f1_threshold`` is the component
            threshold unless ``component_threshold`` is given (then a single pass suffices). The official SMIYC
            protocol is ``mode="smiyc"``.
        track: ``"anomaly"`` or ``"obstacle"`` component size thresholds.
        cast_float16: round scores to float16 first, like the SMIYC pipeline.
        progress: show a progress bar per pass (``total`` = number of frames, if known).

    Returns the pixel metrics dict, updated with the component metrics when ``components`` is set.
    """
    pixel = PixelMetricAccumulator(mode, cast_float16=cast_float16)
    component = ComponentMetricAccumulator(track, component_threshold, cast_float16=cast_float16)
    single_pass = components and component_threshold is not None
    for scores, labels in tqdm(frames(), desc=f"pixel metrics ({mode})", total=total, disable=not progress):
        pixel.add(scores, labels)
        if single_pass:
            component.add(scores, labels)
    result = pixel.compute()
    if components:
        if not single_pass:
            component.threshold = _component_threshold(result)
            for scores, labels in tqdm(frames(), desc="component metrics", total=total, disable=not progress):
                component.add(scores, labels)
        if component.num_images != pixel.num_images:
            raise ValueError(
                f"frames() gave {pixel.num_images} frames in the first pass but {component.num_images} in the second; "
                "expected the same frames twice"
            )
        result.update(component.compute())
    return result


def compute_metrics(
    predictions: Iterable[Any],
    references: Iterable[Any],
    *,
    mode: PixelMode = "exact",
    components: bool = False,
    track: Track = "anomaly",
    component_threshold: float | None = None,
    cast_float16: bool = False,
) -> dict[str, Any]:
    """All metrics for score maps and label maps held in memory (sizes may differ from image to image).

    Args:
        predictions: (H, W) anomaly score maps (numpy arrays, tensors or nested lists), higher = more anomalous.
        references: (H, W) label maps, 0 inlier, 1 anomaly, 255 void.
        mode, track, component_threshold, cast_float16: see :func:`evaluate_two_pass`.
        components: also compute sIoU, PPV and mean F1 (SMIYC component metrics).

    Returns ``auprc``, ``fpr95``, ``auroc``, ``best_f1``, ``best_f1_threshold`` (+ extras), and with
    ``components=True`` also ``siou``, ``ppv``, ``mean_f1``, ``f1_per_threshold``; fractions in [0, 1].
    """
    predictions = predictions if isinstance(predictions, Sequence) else list(predictions)
    references = references if isinstance(references, Sequence) else list(references)
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} references; expected one label map per score map"
        )
    if len(predictions) == 0:
        raise ValueError("no prediction given; expected at least one (score map, label map) pair")
    return evaluate_two_pass(
        lambda: zip(predictions, references),
        mode=mode,
        components=components,
        track=track,
        component_threshold=component_threshold,
        cast_float16=cast_float16,
    )
