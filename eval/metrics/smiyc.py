"""SegmentMeIfYouCan's binned pixel curves, reproducing the benchmark's conventions and quirks:
``PixBinaryClass`` (768 dynamic per-frame bins, ``bin_strategy='percentiles'``, :class:`_SmiycDynamicState`) and
``PixBinaryClass-uniThr`` (4096 uniform bins on [-0.01, 1.01], :class:`_SmiycUniformState`). Used through
:class:`~mask2anomaly_eval.metrics.PixelMetricAccumulator` (``mode="smiyc"`` / ``"smiyc_uniform"``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import TPR_TARGET, CurvePoints

# SegmentMeIfYouCan `PixBinaryClass` / `PixBinaryClass-uniThr` settings (metrics/pixel_classification.py).
SMIYC_DYNAMIC_BINS = 768
SMIYC_UNIFORM_BINS = 4096
SMIYC_UNIFORM_RANGE = (-0.01, 1.01)


def smiyc_frame_bins(
    positives: np.ndarray, negatives: np.ndarray, num_bins: int = SMIYC_DYNAMIC_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One frame's dynamic ('percentiles') bins as in SMIYC's ``binary_confusion_matrix``.

    Returns ``(lower_edges, positive_counts, negative_counts)`` in ascending threshold order: each bin's pixel
    counts are attributed to its lower edge, and every edge but the top one is a threshold of the pooled curve.
    The bin edges are ``np.unique`` of ``[vmin - eps, vmax + eps]`` (``eps = max(0.01 * (vmax - vmin), 0.01)``
    over the frame's non-void scores) and the linear-interpolation quantiles of the positive and of the
    negative scores at ``min(num_bins // 2, n)`` evenly spaced levels; counts come from ``np.histogram`` (bins
    closed on the left, the last one closed on both sides).

    ``vmax - vmin`` is computed in the score dtype and ``eps`` and the two outer edges in float64, which is what
    the official code does under numpy 1.x (the environment of the reference fixtures); numpy 2 would keep them in
    float32, which only moves the two outer edges by less than one float32 ulp.
    """
    values_min = min(v.min() for v in (positives, negatives) if v.size)
    values_max = max(v.max() for v in (positives, negatives) if v.size)
    value_range = float(values_max - values_min)
    eps = max(value_range * 1e-2, 1e-2)
    edges = [np.array([float(values_min) - eps, float(values_max) + eps])]
    for values in (positives, negatives):
        if values.size:
            edges.append(np.quantile(values, np.linspace(0, 1, min(num_bins // 2, values.size))))
    edges = np.unique(np.concatenate(edges))
    positive_counts = np.histogram(positives, bins=edges)[0]
    negative_counts = np.histogram(negatives, bins=edges)[0]
    return edges[:-1], positive_counts.astype(np.int64), negative_counts.astype(np.int64)


def smiyc_curve_metrics(
    thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray, num_pos: int, num_neg: int, curve_points: int = 0
) -> dict[str, Any]:
    """SMIYC's ``curves_from_cmats`` on a pooled curve given from the highest threshold down.

    ``tp``/``fp`` are cumulative counts at each (possibly repeated) threshold. Reproduced conventions:

    * of a run of equal thresholds only the last entry is kept (it has all their pixels), but index 0 is always
      kept — if the top threshold is shared by several frames the curve gets a spurious partial first point
      whose counts depend on the tie order of ``np.argsort`` (quirk 2 of the reference README);
    * a (0, 0) point with threshold ``max + 1`` is prepended when the first point is not empty, a (P, N) point
      with threshold ``max - 1`` is appended when the last is not complete;
    * precision is 1 where nothing is predicted; ``AP = sum(diff(recall) * precision[1:])``,
      ``AUROC = trapezoid(tpr, fpr)``, ``FPR95 = fpr[searchsorted(tpr, 0.95)]`` (1.0 if never reached),
      ``best_F1 = F1[nanargmax]`` with ``F1 = 2tp / (2tp + fp + fn)`` — its threshold is a bin's lower edge, so
      that operating point predicts ``score >= best_f1_threshold``.

    With ``curve_points`` > 0 the result also holds ``curve``, the benchmark's curve thinned for plotting.
    """
    keep = np.concatenate([[0], np.flatnonzero(thresholds[:-1] != thresholds[1:]), [thresholds.size - 1]])
    tp, fp, thresholds = tp[keep], fp[keep], thresholds[keep]
    fn = num_pos - tp
    tn = num_neg - fp
    if tp[0] != 0 or fp[0] != 0:
        tp, fp = np.concatenate([[0.0], tp]), np.concatenate([[0.0], fp])
        fn, tn = np.concatenate([[num_pos], fn]), np.concatenate([[num_neg], tn])
        thresholds = np.concatenate([[float(np.max(thresholds)) + 1], thresholds])
    if tp[-1] != num_pos or fp[-1] != num_neg:
        tp, fp = np.concatenate([tp, [num_pos]]), np.concatenate([fp, [num_neg]])
        fn, tn = np.concatenate([fn, [0.0]]), np.concatenate([tn, [0.0]])
        # (sic) the official code pads with max - 1, not a value below the minimum (quirk 9)
        thresholds = np.concatenate([thresholds, [float(np.max(thresholds)) - 1]])

    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = tp / (tp + fn)
        fpr = fp / (fp + tn)
        predicted = tp + fp
        precision = np.ones(tp.size, np.float64)
        precision[predicted > 0] = tp[predicted > 0] / predicted[predicted > 0]
        recall = tp / (tp + fn)
        f1 = (2 * tp) / (2 * tp + fp + fn)

    index95 = int(np.searchsorted(tpr, TPR_TARGET))
    if index95 < tpr.size:
        fpr95, fpr95_threshold = float(fpr[index95]), float(thresholds[index95])
    else:
        fpr95, fpr95_threshold = 1.0, 0.0
    index50 = int(np.searchsorted(recall, 0.5))
    recall50_threshold = float(thresholds[index50]) if index50 < recall.size else float("nan")
    if np.isnan(f1).all():
        best_f1 = best_f1_threshold = float("nan")
    else:
        best = int(np.nanargmax(f1))
        best_f1, best_f1_threshold = float(f1[best]), float(thresholds[best])
    result = {
        "auprc": float(np.sum(np.diff(recall) * precision[1:])),
        "fpr95": fpr95,
        "auroc": float((np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0).sum()),
        "best_f1": best_f1,
        "best_f1_threshold": best_f1_threshold,
        "fpr95_threshold": fpr95_threshold,
        "recall50_threshold": recall50_threshold,
        "num_pos": int(num_pos),
        "num_neg": int(num_neg),
        "num_curve_points": int(tp.size),
    }
    if curve_points > 0:
        thinned = CurvePoints(num_pos, num_neg, curve_points)
        thinned.add(tp, fp, thresholds)
        result["curve"] = thinned.result()
    return result


class _SmiycDynamicState:
    """SMIYC ``PixBinaryClass``: per-frame dynamic bins, pooled by sorting all frames' thresholds.

    Memory is about 3 x 768 numbers per frame. Pooling follows ``aggregate_dynamic_bins``: the frames' (threshold,
    counts) triples are concatenated in the order the frames were added (each frame from its top bin down),
    ordered by ``np.argsort(thresholds)[::-1]`` (numpy's default, unstable sort) and cumulated. A pixel therefore
    only counts as predicted once the threshold reaches the lower edge of its own frame's bin. When the largest
    threshold occurs in several frames the result depends on the frame order and on numpy's tie order (quirk 2);
    ``top_threshold_tied`` in the result says when that happened. ``merge`` appends the other accumulator's
    frames after this one's.
    """

    def __init__(self, num_bins: int = SMIYC_DYNAMIC_BINS) -> None:
        self.num_bins = num_bins
        self.frames: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.num_pos = 0
        self.num_neg = 0

    def add(self, positives: np.ndarray, negatives: np.ndarray) -> None:
        if positives.size + negatives.size == 0:
            # The official code crashes on a frame without non-void pixel (np.min of an empty array); such a
            # frame has nothing to contribute, so it is skipped.
            return
        self.frames.append(smiyc_frame_bins(positives, negatives, self.num_bins))
        self.num_pos += positives.size
        self.num_neg += negatives.size

    def merge(self, other: _SmiycDynamicState) -> None:
        self.frames.extend(other.frames)
        self.num_pos += other.num_pos
        self.num_neg += other.num_neg

    def state_dict(self) -> dict[str, np.ndarray]:
        lengths = np.array([f[0].size for f in self.frames], np.int64)
        def cat(i: int, dtype: Any) -> np.ndarray:
            return np.concatenate([f[i] for f in self.frames]) if self.frames else np.zeros(0, dtype)
        return {
            "frame_lengths": lengths,
            "thresholds": cat(0, np.float64),
            "tp_rel": cat(1, np.int64),
            "fp_rel": cat(2, np.int64),
            "totals": np.array([self.num_pos, self.num_neg], np.int64),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        bounds = np.concatenate([[0], np.cumsum(state["frame_lengths"])])
        for start, end in zip(bounds[:-1], bounds[1:]):
            self.frames.append(tuple(np.asarray(state[k][start:end]) for k in ("thresholds", "tp_rel", "fp_rel")))
        self.num_pos += int(state["totals"][0])
        self.num_neg += int(state["totals"][1])

    def compute(self, curve_points: int = 0) -> dict[str, Any]:
        if not self.frames:
            raise ValueError("no valid pixel was added (every pixel is void or no image was added)")
        thresholds = np.concatenate([f[0][::-1] for f in self.frames])
        tp_rel = np.concatenate([f[1][::-1] for f in self.frames])
        fp_rel = np.concatenate([f[2][::-1] for f in self.frames])
        order = np.argsort(thresholds)[::-1]
        thresholds = thresholds[order]
        tp = np.cumsum(tp_rel[order].astype(np.float64))
        fp = np.cumsum(fp_rel[order].astype(np.float64))
        result = smiyc_curve_metrics(thresholds, tp, fp, self.num_pos, self.num_neg, curve_points)
        result["top_threshold_tied"] = bool(sum(f[0][-1] == thresholds[0] for f in self.frames) > 1)
        return result


class _SmiycUniformState:
    """SMIYC ``PixBinaryClass-uniThr``: 4096 equal bins on [-0.01, 1.01] summed over frames (constant memory).

    Scores outside the range are never counted as predicted (``np.histogram`` drops them) but still count in the
    totals, as in the official code; the bin edges are those ``np.histogram`` returns for the first frame.
    """

    def __init__(self, num_bins: int = SMIYC_UNIFORM_BINS) -> None:
        self.num_bins = num_bins
        self.edges: np.ndarray | None = None
        self.tp_hist = np.zeros(num_bins, np.int64)
        self.fp_hist = np.zeros(num_bins, np.int64)
        self.num_pos = 0
        self.num_neg = 0

    def add(self, positives: np.ndarray, negatives: np.ndarray) -> None:
        if positives.size + negatives.size == 0:
            return
        tp_hist, edges = np.histogram(positives, bins=self.num_bins, range=SMIYC_UNIFORM_RANGE)
        fp_hist, _ = np.histogram(negatives, bins=self.num_bins, range=SMIYC_UNIFORM_RANGE)
        if self.edges is None:
            self.edges = edges
        self.tp_hist += tp_hist
        self.fp_hist += fp_hist
        self.num_pos += positives.size
        self.num_neg += negatives.size

    def merge(self, other: _SmiycUniformState) -> None:
        if self.edges is None:
            self.edges = other.edges
        self.tp_hist += other.tp_hist
        self.fp_hist += other.fp_hist
        self.num_pos += other.num_pos
        self.num_neg += other.num_neg

    def state_dict(self) -> dict[str, np.ndarray]:
        return {
            "edges": self.edges if self.edges is not None else np.zeros(0, np.float64),
            "tp_hist": self.tp_hist.copy(),
            "fp_hist": self.fp_hist.copy(),
            "totals": np.array([self.num_pos, self.num_neg], np.int64),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        other = _SmiycUniformState(self.num_bins)
        other.edges = np.asarray(state["edges"]) if np.asarray(state["edges"]).size else None
        other.tp_hist = np.asarray(state["tp_hist"]).astype(np.int64)
        other.fp_hist = np.asarray(state["fp_hist"]).astype(np.int64)
        other.num_pos, other.num_neg = (int(v) for v in state["totals"])
        self.merge(other)

    def compute(self, curve_points: int = 0) -> dict[str, Any]:
        if self.edges is None:
            raise ValueError("no valid pixel was added (every pixel is void or no image was added)")
        tp = np.cumsum(self.tp_hist[::-1]).astype(np.float64)
        fp = np.cumsum(self.fp_hist[::-1]).astype(np.float64)
        thresholds = self.edges[::-1][1:]
        return smiyc_curve_metrics(thresholds, tp, fp, self.num_pos, self.num_neg, curve_points)
