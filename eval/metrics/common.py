"""Conventions and input checks shared by the pixel metrics (exact and SMIYC modes) and the component metrics:
labels 0 inlier / 1 anomaly / 255 void, the TPR of FPR95, and the conversion and validation of one (score map,
label map) pair."""

from __future__ import annotations

from typing import Any

import numpy as np

VOID_LABEL = 255
TPR_TARGET = 0.95


def to_numpy(array: Any) -> np.ndarray:
    """Convert a numpy array, a torch tensor (any device, bfloat16 included) or nested lists to a numpy array."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        array = array.detach().cpu()
        if str(array.dtype) == "torch.bfloat16":
            array = array.float()
        array = array.numpy()
    return np.asarray(array)


def check_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as a uint8 array after checking that it only holds 0 (inlier), 1 (anomaly) or 255 (void).

    Boolean masks are accepted (True = anomaly). Raises ``ValueError`` naming the offending values otherwise.
    """
    labels = to_numpy(labels)
    if labels.dtype == np.bool_:
        return labels.view(np.uint8)
    if labels.dtype.kind not in "iuf":
        raise ValueError(f"{name} have dtype {labels.dtype}; expected an integer label map with values 0, 1 or 255")
    if labels.dtype == np.uint8:
        bad = (labels > 1) & (labels != VOID_LABEL)  # two cheap passes: this runs on every frame
    else:
        bad = (labels != 0) & (labels != 1) & (labels != VOID_LABEL)
    if bad.any():
        raise ValueError(
            f"{name} contain the value(s) {np.unique(labels[bad])[:10].tolist()}; expected only 0 (inlier), "
            "1 (anomaly) or 255 (void)"
        )
    return labels.astype(np.uint8, copy=False)


def check_frame(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate one (score map, label map) pair; return numpy arrays (scores unchanged in dtype, labels uint8).

    Raises ``ValueError`` for a shape mismatch, an empty map, a non-numeric score map or label values other than
    0/1/255. Non-finite scores are checked later, on the non-void pixels only (void pixels are ignored entirely).
    """
    scores = to_numpy(scores)
    labels = check_labels(labels)
    if scores.shape != labels.shape:
        raise ValueError(
            f"scores have shape {scores.shape} but labels have shape {labels.shape}; expected one score per "
            "labelled pixel (the same shape)"
        )
    if scores.size == 0:
        raise ValueError(f"empty score map (shape {scores.shape}); expected at least one pixel")
    if scores.dtype.kind not in "fiub":
        raise ValueError(f"scores have dtype {scores.dtype}; expected real-valued anomaly scores")
    return scores, labels


def split_by_class(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the anomaly (label 1) and inlier (label 0) pixels, flattened copies; void pixels dropped.

    Raises ``ValueError`` if any of them is NaN or infinite.
    """
    flat_scores = scores.reshape(-1)
    flat_labels = labels.reshape(-1)
    positives = flat_scores[flat_labels == 1]
    negatives = flat_scores[flat_labels == 0]
    if scores.dtype.kind == "f":
        for values in (positives, negatives):
            if not np.isfinite(values).all():
                num_nan = int(np.isnan(values).sum())
                num_inf = int(np.isinf(values).sum())
                raise ValueError(
                    f"scores contain {num_nan} NaN and {num_inf} infinite value(s) on non-void pixels; expected "
                    "finite anomaly scores (set such pixels' label to 255 to ignore them)"
                )
    return positives, negatives


class CurvePoints:
    """A thinned copy of a pooled curve for plotting: operating points (cumulative tp, fp, threshold) are given
    from the highest threshold down, a chunk at a time, and a point is kept when it enters a new cell of a
    ``resolution`` x ``resolution`` grid over (TPR, FPR), plus the first and the last point, so that at most about
    ``2 * resolution`` points describe both the ROC and the PR curve, whatever the number of distinct scores.
    """

    def __init__(self, num_pos: int, num_neg: int, resolution: int = 1000) -> None:
        self.num_pos, self.num_neg, self.resolution = num_pos, num_neg, resolution
        self._last_cell: int | None = None
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._final: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, tp: np.ndarray, fp: np.ndarray, thresholds: np.ndarray) -> None:
        if tp.size == 0:
            return
        k = self.resolution
        tpr_cell = np.floor(tp / max(self.num_pos, 1) * k).astype(np.int64)
        fpr_cell = np.floor(fp / max(self.num_neg, 1) * k).astype(np.int64)
        cell = tpr_cell * (k + 1) + fpr_cell
        previous = np.empty_like(cell)
        previous[0] = -1 if self._last_cell is None else self._last_cell
        previous[1:] = cell[:-1]
        keep = cell != previous
        self._parts.append((tp[keep], fp[keep], np.asarray(thresholds, np.float64)[keep]))
        self._last_cell = int(cell[-1])
        self._final = (tp[-1:], fp[-1:], np.asarray(thresholds[-1:], np.float64))

    def result(self) -> dict[str, list[float]]:
        """``thresholds``, ``tpr`` (= recall), ``fpr`` and ``precision`` of the kept points, highest threshold
        first (empty lists when nothing was added)."""
        parts = self._parts + ([self._final] if self._final is not None else [])
        if not parts:
            return {"thresholds": [], "tpr": [], "fpr": [], "precision": []}
        tp, fp, thresholds = (np.concatenate(arrays) for arrays in zip(*parts))
        if tp.size > 1 and tp[-1] == tp[-2] and fp[-1] == fp[-2]:
            tp, fp, thresholds = tp[:-1], fp[:-1], thresholds[:-1]  # the last point was kept already
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
        return {
            "thresholds": thresholds.tolist(),
            "tpr": (tp / max(self.num_pos, 1)).tolist(),
            "fpr": (fp / max(self.num_neg, 1)).tolist(),
            "precision": precision.tolist(),
        }
