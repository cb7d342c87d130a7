"""Component-level anomaly-segmentation metrics as SegmentMeIfYouCan defines them (sIoU, PPV, mean F1), streaming.

Per image (the benchmark's ``default_instancer`` + ``segment_metrics``):

1. prediction = ``score > threshold`` (**strict**, compared in the score map's dtype like numpy does with a Python
   float), void pixels (255) set to 0;
2. connected components with 8-connectivity of the prediction and of the ground truth (label 1; void separates
   GT components);
3. predicted components with fewer than ``min_pred_size`` pixels are removed — counted *before* small GT blobs are
   voided, so they include pixels lying on such blobs;
4. GT components with fewer than ``min_gt_size`` pixels become void; everything below is restricted to the
   remaining non-void pixels (a prediction lying on a voided blob loses those pixels);
5. for every kept GT component ``k``: with ``C`` the predicted components touching it,
   ``sIoU(k) = |k ∩ C| / (|C| + |k| - |k ∩ C| - |C ∩ other GT components|)`` (0 if nothing touches it);
   for every predicted component ``j``: ``PPV(j) = |j ∩ GT| / |j|``;
6. per tau in ``np.linspace(0.25, 0.75, 11)``: TP = #(sIoU >= tau), FN = #(sIoU < tau), FP = #(PPV < tau).

Over a dataset the counts are summed, ``F1_tau = 2TP / (2TP + FN + FP)``, ``mean_f1`` is the mean of the 11 F1
values, and mean sIoU / PPV are means over all components of the dataset (not of per-image means). The official
threshold is the best-F1 threshold of the benchmark's pixel curve (``PixelMetricAccumulator(mode="smiyc")``), whose
operating point counts ``score >= threshold`` while the instancer keeps ``score > threshold`` (quirk 3 of the
reference README: with ties at the threshold, pixels equal to it are dropped; a constant score predicts nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from transformers.utils import logging

from .common import check_frame, to_numpy

logger = logging.get_logger(__name__)

Track = Literal["anomaly", "obstacle"]
# (min_pred_size = `thresh_segsize`, min_gt_size = `thresh_instsize`) of SegEval-AnomalyTrack / -ObstacleTrack.
TRACK_SIZE_THRESHOLDS: dict[str, tuple[int, int]] = {"anomaly": (500, 100), "obstacle": (50, 10)}
# Exactly the official values (0.6000000000000001 included, so sIoU == 0.6 does not pass tau "0.60").
SIOU_THRESHOLDS: np.ndarray = np.linspace(0.25, 0.75, 11, endpoint=True)
_EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)
# Largest (GT x predicted) contingency table built densely; beyond it the pairs are counted with np.unique.
_DENSE_TABLE_LIMIT = 1 << 24


@dataclass(frozen=True)
class FrameComponentStats:
    """One image's component statistics, components in connected-component label order (raster scan).

    Sizes count non-void pixels after small GT blobs were voided.
    """

    siou_gt: np.ndarray
    size_gt: np.ndarray
    ppv_pred: np.ndarray
    siou_pred: np.ndarray
    size_pred: np.ndarray


def _contingency(gt_ids: np.ndarray, pred_ids: np.ndarray, num_gt: int, num_pred: int) -> np.ndarray:
    """(num_gt + 1, num_pred + 1) pixel counts of every (GT component, predicted component) pair; 0 = none."""
    shape = (num_gt + 1, num_pred + 1)
    codes = gt_ids.astype(np.int64) * shape[1] + pred_ids
    if shape[0] * shape[1] <= _DENSE_TABLE_LIMIT:
        return np.bincount(codes, minlength=shape[0] * shape[1]).reshape(shape)
    table = np.zeros(shape, np.int64)
    pairs, counts = np.unique(codes, return_counts=True)
    table[pairs // shape[1], pairs % shape[1]] = counts
    return table


def frame_component_stats(
    scores: Any, labels: Any, threshold: float, min_pred_size: int, min_gt_size: int
) -> FrameComponentStats:
    """Component statistics of one image (steps 1-5 of the module docstring)."""
    scores, labels = check_frame(scores, labels)
    if scores.ndim != 2:
        raise ValueError(f"component metrics need 2-D maps; got scores of shape {scores.shape}")
    void = labels == 255
    if scores.dtype.kind == "f":
        if not np.isfinite(scores[~void]).all():
            raise ValueError("scores contain NaN or infinite values on non-void pixels; expected finite anomaly scores")
        # numpy compares a float32 map with a Python float in float32 (the official `anomaly_p > thresh_p`).
        threshold_value = scores.dtype.type(threshold)
    else:
        threshold_value = threshold
    predicted = scores > threshold_value
    predicted &= ~void

    # scipy only here: the pixel metrics, the facade and the runner import without it (remote code never needs it).
    from scipy import ndimage

    gt_components, num_gt = ndimage.label(labels == 1, structure=_EIGHT_CONNECTIVITY)
    pred_components, num_pred = ndimage.label(predicted, structure=_EIGHT_CONNECTIVITY)

    pred_sizes = np.bincount(pred_components.ravel(), minlength=num_pred + 1)
    kept_pred = pred_sizes >= min_pred_size
    kept_pred[0] = False
    gt_sizes = np.bincount(gt_components.ravel(), minlength=num_gt + 1)
    # Index 0 is the background (inlier + void pixels) and is tested too, as in the official loop over
    # `range(n_anomaly + 1)`: an image with fewer than `min_gt_size` non-anomaly pixels loses its inlier pixels.
    voided_gt = gt_sizes < min_gt_size
    roi = ~void
    if voided_gt.any():
        roi &= ~voided_gt[gt_components]

    # Compact ids (1..n in label order) of the kept components; 0 = none.
    gt_map = np.zeros(num_gt + 1, np.int64)
    kept_gt = ~voided_gt
    kept_gt[0] = False
    gt_map[kept_gt] = np.arange(1, int(kept_gt.sum()) + 1)
    pred_map = np.zeros(num_pred + 1, np.int64)
    pred_map[kept_pred] = np.arange(1, int(kept_pred.sum()) + 1)
    table = _contingency(
        gt_map[gt_components[roi]], pred_map[pred_components[roi]], int(kept_gt.sum()), int(kept_pred.sum())
    )
    # A predicted component lying entirely on void / voided GT has no pixel left and is not evaluated.
    present = np.concatenate([[True], table[:, 1:].sum(axis=0) > 0])
    table = table[:, present]

    overlap = table[1:, 1:]
    touching = (overlap > 0).astype(np.int64)
    size_gt = table[1:].sum(axis=1)
    size_pred = table[:, 1:].sum(axis=0)
    covered_gt = size_gt - table[1:, 0]
    covered_pred = size_pred - table[0, 1:]
    # The official union |C| + |k| - |k ∩ C| - |C ∩ other GT| reduces to |k| + |C ∩ non-anomaly pixels|
    # (and symmetrically for predictions); integers, so the division gives the official float exactly.
    union_gt = size_gt + touching @ table[0, 1:]
    union_pred = size_pred + table[1:, 0] @ touching
    return FrameComponentStats(
        siou_gt=covered_gt / union_gt if size_gt.size else np.zeros(0),
        size_gt=size_gt,
        ppv_pred=covered_pred / size_pred if size_pred.size else np.zeros(0),
        siou_pred=covered_pred / union_pred if size_pred.size else np.zeros(0),
        size_pred=size_pred,
    )


class ComponentMetricAccumulator:
    """Streaming SMIYC component metrics over a dataset.

    Args:
        track: ``"anomaly"`` (predicted components < 500 px removed, GT components < 100 px voided) or
            ``"obstacle"`` (50 / 10 px).
        threshold: pixel threshold; a pixel is predicted anomalous when ``score > threshold``. It must be known
            before images are added: pass the best-F1 threshold of the pixel curve (official: the ``"smiyc"`` mode's
            ``best_f1_threshold``), e.g. via :func:`mask2anomaly_eval.metrics.evaluate_two_pass`.
        min_pred_size, min_gt_size: override the track's size thresholds.
        cast_float16: round scores to float16 first, like the SMIYC pipeline stores submissions (the threshold
            is then compared in float16 too).

    ``add`` returns the image's :class:`FrameComponentStats`; ``compute`` returns ``siou`` (mean sIoU over GT
    components), ``ppv`` (mean PPV over predicted components), ``mean_f1``, ``f1_per_threshold`` (11 values),
    the per-tau counts and component totals. Undefined means (no GT or no predicted component) and F1 values
    with 2TP + FN + FP = 0 are NaN (the official code raises ``ZeroDivisionError`` for the latter).
    """

    def __init__(
        self,
        track: Track = "anomaly",
        threshold: float | None = None,
        *,
        min_pred_size: int | None = None,
        min_gt_size: int | None = None,
        cast_float16: bool = False,
    ) -> None:
        if track not in TRACK_SIZE_THRESHOLDS:
            raise ValueError(f"unknown track {track!r}; expected one of {tuple(TRACK_SIZE_THRESHOLDS)}")
        default_pred, default_gt = TRACK_SIZE_THRESHOLDS[track]
        self.track: str = track
        self.min_pred_size = default_pred if min_pred_size is None else int(min_pred_size)
        self.min_gt_size = default_gt if min_gt_size is None else int(min_gt_size)
        self.cast_float16 = cast_float16
        self._threshold: float | None = None
        if threshold is not None:
            self.threshold = threshold
        self.reset()

    @property
    def threshold(self) -> float | None:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = float(value)
        if np.isnan(value):
            raise ValueError("component threshold is NaN; expected a finite score threshold")
        if getattr(self, "num_images", 0) and value != self._threshold:
            raise ValueError(
                f"cannot change the threshold from {self._threshold} to {value} after {self.num_images} image(s) "
                "were added; call reset() first"
            )
        self._threshold = value

    def reset(self) -> None:
        self.num_images = 0
        self.tp = np.zeros(SIOU_THRESHOLDS.size, np.int64)
        self.fn = np.zeros(SIOU_THRESHOLDS.size, np.int64)
        self.fp = np.zeros(SIOU_THRESHOLDS.size, np.int64)
        self.sum_siou_gt = 0.0
        self.sum_siou_pred = 0.0
        self.sum_ppv = 0.0
        self.num_gt = 0
        self.num_pred = 0

    def add(self, scores: Any, labels: Any) -> FrameComponentStats:
        """Add one image (2-D score map and 0/1/255 label map); returns its per-component statistics."""
        if self._threshold is None:
            raise ValueError(
                "the component threshold is not set; pass threshold=... (e.g. the pixel curve's best_f1_threshold) "
                "or use evaluate_two_pass(), which computes the pixel curve first"
            )
        scores = to_numpy(scores)
        if self.cast_float16:
            scores = scores.astype(np.float16)
        stats = frame_component_stats(scores, labels, self._threshold, self.min_pred_size, self.min_gt_size)
        self.tp += (stats.siou_gt[None, :] >= SIOU_THRESHOLDS[:, None]).sum(axis=1)
        self.fn += (stats.siou_gt[None, :] < SIOU_THRESHOLDS[:, None]).sum(axis=1)
        self.fp += (stats.ppv_pred[None, :] < SIOU_THRESHOLDS[:, None]).sum(axis=1)
        # Per-image sums added in image order, like the official `sum(np.sum(r.sIoU_gt) for r in frames)`.
        self.sum_siou_gt += float(np.sum(stats.siou_gt))
        self.sum_siou_pred += float(np.sum(stats.siou_pred))
        self.sum_ppv += float(np.sum(stats.ppv_pred))
        self.num_gt += stats.siou_gt.size
        self.num_pred += stats.ppv_pred.size
        self.num_images += 1
        return stats

    def merge(self, other: ComponentMetricAccumulator) -> ComponentMetricAccumulator:
        """Add ``other``'s counts into this accumulator (same track sizes and threshold); returns ``self``."""
        if not isinstance(other, ComponentMetricAccumulator):
            raise ValueError(f"can only merge a ComponentMetricAccumulator, got {type(other).__name__}")
        mine = (self.min_pred_size, self.min_gt_size, self._threshold)
        theirs = (other.min_pred_size, other.min_gt_size, other._threshold)
        if mine != theirs and other.num_images:
            raise ValueError(
                f"cannot merge component statistics made with (min_pred_size, min_gt_size, threshold) = {theirs} "
                f"into {mine}; expected the same settings"
            )
        self.tp += other.tp
        self.fn += other.fn
        self.fp += other.fp
        self.sum_siou_gt += other.sum_siou_gt
        self.sum_siou_pred += other.sum_siou_pred
        self.sum_ppv += other.sum_ppv
        self.num_gt += other.num_gt
        self.num_pred += other.num_pred
        self.num_images += other.num_images
        return self

    def compute(self) -> dict[str, Any]:
        """Dataset-level sIoU, PPV, F1 per tau and mean F1 (see the class docstring for the keys)."""
        if self.num_images == 0:
            raise ValueError("no image was added; call add(scores, labels) first")
        nan = float("nan")
        f1 = []
        for tp, fn, fp in zip(self.tp.tolist(), self.fn.tolist(), self.fp.tolist()):
            f1.append(2 * tp / (2 * tp + fn + fp) if 2 * tp + fn + fp else nan)
        mean_f1 = 0.0
        for value in f1:  # sequential sum then division, as the official aggregate
            mean_f1 += value
        mean_f1 /= len(f1)
        if self.num_gt == 0 and self.num_pred == 0:
            logger.warning("no GT and no predicted component in the whole dataset: component F1 is undefined (NaN)")
        return {
            "siou": self.sum_siou_gt / self.num_gt if self.num_gt else nan,
            "ppv": self.sum_ppv / self.num_pred if self.num_pred else nan,
            "mean_f1": mean_f1,
            "f1_per_threshold": f1,
            "siou_thresholds": SIOU_THRESHOLDS.tolist(),
            "tp_per_threshold": self.tp.tolist(),
            "fn_per_threshold": self.fn.tolist(),
            "fp_per_threshold": self.fp.tolist(),
            "siou_pred": self.sum_siou_pred / self.num_pred if self.num_pred else nan,
            "num_gt_components": self.num_gt,
            "num_pred_components": self.num_pred,
            "component_threshold": self._threshold,
            "min_pred_size": self.min_pred_size,
            "min_gt_size": self.min_gt_size,
            "num_images": self.num_images,
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        """The accumulated state as numpy arrays only (for ``accelerate``'s gather or saving)."""
        return {
            "counts": np.stack([self.tp, self.fn, self.fp]),
            "sums": np.array([self.sum_siou_gt, self.sum_siou_pred, self.sum_ppv], np.float64),
            "totals": np.array([self.num_gt, self.num_pred, self.num_images], np.int64),
            "settings": np.array(
                [self.min_pred_size, self.min_gt_size, np.nan if self._threshold is None else self._threshold],
                np.float64,
            ),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ComponentMetricAccumulator:
        """Rebuild an accumulator from :meth:`state_dict` (numpy arrays or CPU tensors)."""
        state = {key: to_numpy(value) for key, value in state.items()}
        min_pred, min_gt, threshold = state["settings"].tolist()
        accumulator = cls(
            "anomaly",
            None if np.isnan(threshold) else threshold,
            min_pred_size=int(min_pred),
            min_gt_size=int(min_gt),
        )
        accumulator.tp, accumulator.fn, accumulator.fp = (row.astype(np.int64) for row in state["counts"])
        accumulator.sum_siou_gt, accumulator.sum_siou_pred, accumulator.sum_ppv = state["sums"].tolist()
        accumulator.num_gt, accumulator.num_pred, accumulator.num_images = state["totals"].tolist()
        for track, sizes in TRACK_SIZE_THRESHOLDS.items():
            if sizes == (accumulator.min_pred_size, accumulator.min_gt_size):
                accumulator.track = track
        return accumulator

    def __repr__(self) -> str:
        return (
            f"ComponentMetricAccumulator(track={self.track!r}, threshold={self._threshold}, "
            f"num_images={self.num_images})"
        )
