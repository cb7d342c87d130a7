"""Exact pixel metrics: equal to scikit-learn (``average_precision_score``, ``roc_auc_score``) and to the Fishyscapes
FPR95 convention (the first ROC operating point with TPR >= 0.95 on the curve with one point per distinct score) up to
float rounding. The state keeps, per class, the sorted distinct scores with their pixel counts: ties are collapsed, so
memory grows with the number of distinct score values (bounded by the float32 values that occur), not with the number
of pixels. Used through :class:`~mask2anomaly_eval.metrics.PixelMetricAccumulator` (``mode="exact"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from transformers.utils import logging

from .common import TPR_TARGET, CurvePoints

logger = logging.get_logger(__name__)

# Distinct scores per chunk of the final sweep: bounds compute()'s temporaries (about a dozen arrays of this length).
_SWEEP_CHUNK = 1 << 18
# Entries per chunk of the in-place duplicate removal when two exact-mode runs merge.
_MERGE_CHUNK = 1 << 20


def _value_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype the exact mode stores scores in: float32 where that is lossless, float64 otherwise."""
    # float16 and integers up to 16 bits are exactly representable in float32 (24-bit significand).
    if dtype.kind == "b" or (dtype.kind in "iuf" and dtype.itemsize <= 2) or dtype == np.float32:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


# --------------------------------------------------------------------------------------------------------------
# Exact mode
# --------------------------------------------------------------------------------------------------------------

# Fast-path state (float32 scores): one sorted uint64 array whose entries pack, from the high bits down, the
# order-preserving uint32 key of a score (bits 63-32), the class (bit 31: 0 inlier, 1 anomaly) and how many pixels
# of that class have that score (bits 30-0). Sorting entries sorts by score, and two sorted arrays merge with
# numpy's stable sort (timsort finds the two runs) in linear time, without gathering a separate counts array.
_KEY_SHIFT = np.uint64(32)
_CLASS_BIT = np.uint64(1 << 31)
_COUNT_MASK = np.uint64((1 << 31) - 1)
# Per-class pixel total up to which packed counts cannot overflow; beyond it (or for float64 scores) the state
# switches to the generic representation (values + int64 counts per class).
_PACKED_COUNT_LIMIT = (1 << 31) - 1


def float32_to_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving map of float32 values to uint32 keys; -0.0 and +0.0 get the same key (they tie)."""
    values = values.astype(np.float32, copy=False) + np.float32(0)  # also turns -0.0 into +0.0
    bits = values.view(np.uint32)
    # Negative floats: flip every bit (larger magnitude = smaller key); others: set the sign bit.
    flip = (np.uint32(0) - (bits >> np.uint32(31))) | np.uint32(0x80000000)
    return bits ^ flip


def keys_to_float32(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float32_to_keys`."""
    keys = keys.astype(np.uint32, copy=False)
    flip = ((keys >> np.uint32(31)) - np.uint32(1)) | np.uint32(0x80000000)
    return (keys ^ flip).view(np.float32)


def _collapse_sorted(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of an ascending array and how often each occurs (int64)."""
    if values.size == 0:
        return values, np.zeros(0, np.int64)
    ends = np.append(np.flatnonzero(values[1:] != values[:-1]), values.size - 1)
    return values[ends], np.diff(ends, prepend=-1)


def _packed_run(sorted_keys: np.ndarray, anomaly: bool) -> np.ndarray:
    keys, counts = _collapse_sorted(sorted_keys)
    run = keys.astype(np.uint64) << _KEY_SHIFT
    run |= counts.astype(np.uint64)
    if anomaly:
        run |= _CLASS_BIT
    return run


def _merge_packed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Merge two sorted packed runs, adding the counts of equal (score, class) entries."""
    merged = np.concatenate([a, b])
    merged.sort(kind="stable")
    # Entries of one (score, class) differ only in their count bits; a run holds each pair at most once, so equal
    # pairs come in adjacent twos. The first of each pair takes the second's count and the second is dropped,
    # compacting in place a chunk at a time: temporaries follow the chunk, not the state.
    size, write, start, skip_first = merged.size, 0, 0, False
    while start < size:
        stop = min(start + _MERGE_CHUNK, size)
        pairs = merged[start:min(stop + 1, size)] >> np.uint64(31)  # one entry past the chunk: straddling pairs
        first = np.flatnonzero(pairs[1:] == pairs[:-1])
        del pairs
        if first.size == 0 and not skip_first:
            if write != start:
                merged[write:write + stop - start] = merged[start:stop]
            write += stop - start
        else:
            merged[start + first] += merged[start + first + 1] & _COUNT_MASK
            keep = np.ones(stop - start, bool)
            keep[0] = not skip_first
            second = first + 1
            keep[second[second < stop - start]] = False
            skip_first = bool(second.size) and bool(second[-1] == stop - start)  # a pair straddles the chunk end
            kept = merged[start:stop][keep]
            merged[write:write + kept.size] = kept
            write += kept.size
        start = stop
    if write < size:
        merged.resize(write, refcheck=False)  # shrinks in place: `merged` is this function's own array
    return merged


def _absorb_packed(base: np.ndarray, run: np.ndarray) -> np.ndarray:
    """Add the counts of ``run``'s entries whose (score, class) ``base`` already holds into ``base``, in place;
    return the other entries. Once the scores saturate, a new image changes counts only, and the state is not
    copied."""
    position = np.searchsorted(base, run & ~_COUNT_MASK)  # first entry of the same (score, class), if any
    hit = position < base.size
    hit[hit] = (base[position[hit]] >> np.uint64(31)) == (run[hit] >> np.uint64(31))
    # Count bits lie below the (score, class) bits, so adding to them keeps `base` sorted.
    base[position[hit]] += run[hit] & _COUNT_MASK
    return run[~hit]


def _merge_counts(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Merge two (sorted distinct values, int64 counts) runs, adding the counts of shared values."""
    values = np.concatenate([a[0], b[0]])
    counts = np.concatenate([a[1], b[1]])
    order = np.argsort(values, kind="stable")  # two sorted runs: a linear-time merge
    values, counts = values[order], counts[order]
    duplicate = np.flatnonzero(values[1:] == values[:-1])
    if duplicate.size:
        counts[duplicate] += counts[duplicate + 1]
        values, counts = np.delete(values, duplicate + 1), np.delete(counts, duplicate + 1)
    return values, counts


class _Runs:
    """A few sorted runs merged like a binary counter: a new run is merged into the previous one while that one
    is at most twice as long. Total merge work is O(n log n) when nothing repeats, and the state collapses to one
    run when the scores saturate (a new image mostly repeats values already seen). With ``absorb``, a run much
    smaller than the first (largest) one first gives that one its counts in place, and only the rest is pushed."""

    def __init__(self, merge: Any, absorb: Any = None) -> None:
        self._merge = merge
        self._absorb = absorb
        self.runs: list[Any] = []

    @staticmethod
    def _size(run: Any) -> int:
        return run[0].size if isinstance(run, tuple) else run.size

    def push(self, run: Any) -> None:
        if self._absorb is not None and self.runs and self._size(self.runs[0]) >= 4 * self._size(run):
            run = self._absorb(self.runs[0], run)
        if self._size(run) == 0:
            return
        self.runs.append(run)
        while len(self.runs) > 1 and self._size(self.runs[-2]) <= 2 * self._size(self.runs[-1]):
            last = self.runs.pop()
            self.runs[-1] = self._merge(self.runs[-1], last)

    def compact(self) -> Any:
        """Merge everything into one run and return it (None when empty)."""
        while len(self.runs) > 1:
            last = self.runs.pop()
            self.runs[-1] = self._merge(self.runs[-1], last)
        return self.runs[0] if self.runs else None

    @property
    def nbytes(self) -> int:
        return sum(run[0].nbytes + run[1].nbytes if isinstance(run, tuple) else run.nbytes for run in self.runs)


class _ExactState:
    """Exact pooled-pixel curve state: the distinct scores of each class with their pixel counts.

    Float32 (and narrower) scores use the packed uint64 fast path; float64 scores, or more than 2**31 - 1 pixels
    of one class, switch to a generic representation (per class, sorted distinct values and int64 counts).
    """

    def __init__(self) -> None:
        self.packed = _Runs(_merge_packed, _absorb_packed)
        self.generic: tuple[_Runs, _Runs] | None = None  # (anomaly runs, inlier runs)
        self.value_dtype = np.dtype(np.float32)
        self.num_pos = 0
        self.num_neg = 0

    def _needs_generic(self, dtype: np.dtype, num_pos: int, num_neg: int) -> bool:
        return dtype == np.float64 or max(num_pos, num_neg) > _PACKED_COUNT_LIMIT

    def _to_generic(self, dtype: np.dtype) -> None:
        if self.generic is None:
            pos_values, pos_counts, neg_values, neg_counts = self.class_arrays()
            self.generic = (_Runs(_merge_counts), _Runs(_merge_counts))
            self.generic[0].push((pos_values, pos_counts))
            self.generic[1].push((neg_values, neg_counts))
            self.packed = _Runs(_merge_packed, _absorb_packed)
        if dtype.itemsize > self.value_dtype.itemsize:
            # float32 -> float64 is exact, so earlier images keep their ties and order.
            for runs in self.generic:
                runs.runs = [(values.astype(dtype), counts) for values, counts in runs.runs]
        self.value_dtype = np.promote_types(self.value_dtype, dtype)

    def add(self, positives: np.ndarray, negatives: np.ndarray) -> None:
        dtype = _value_dtype(positives.dtype)
        num_pos, num_neg = self.num_pos + positives.size, self.num_neg + negatives.size
        if self.generic is not None or self._needs_generic(dtype, num_pos, num_neg):
            self._to_generic(dtype)
            for values, runs in zip((positives, negatives), self.generic):
                # `values` is a private copy (boolean indexing), so sorting in place costs no extra memory.
                values = values.astype(self.value_dtype, copy=False)
                values.sort()
                runs.push(_collapse_sorted(values))
        else:
            runs = []
            for values, anomaly in ((negatives, False), (positives, True)):
                if values.size:
                    keys = float32_to_keys(values)
                    keys.sort()
                    runs.append(_packed_run(keys, anomaly))
            if runs:
                self.packed.push(runs[0] if len(runs) == 1 else _merge_packed(*runs))
        self.num_pos, self.num_neg = num_pos, num_neg

    def class_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(anomaly values, counts, inlier values, counts), values ascending and distinct, counts int64."""
        if self.generic is not None:
            arrays = []
            for runs in self.generic:
                run = runs.compact()
                arrays.extend(run if run is not None else (np.zeros(0, self.value_dtype), np.zeros(0, np.int64)))
            return tuple(arrays)
        packed = self.packed.compact()
        if packed is None:
            packed = np.zeros(0, np.uint64)
        anomaly = (packed & _CLASS_BIT) != 0
        arrays = []
        for selected in (packed[anomaly], packed[~anomaly]):
            arrays.append(keys_to_float32(selected >> _KEY_SHIFT))
            arrays.append((selected & _COUNT_MASK).astype(np.int64))
        return tuple(arrays)

    def merge(self, other: _ExactState) -> None:
        num_pos, num_neg = self.num_pos + other.num_pos, self.num_neg + other.num_neg
        if self.generic is None and other.generic is None and not self._needs_generic(
            other.value_dtype, num_pos, num_neg
        ):
            run = other.packed.compact()
            if run is not None:
                self.packed.push(run.copy())
        else:
            self._to_generic(other.value_dtype)
            pos_values, pos_counts, neg_values, neg_counts = other.class_arrays()
            self.generic[0].push((pos_values.astype(self.value_dtype), pos_counts))
            self.generic[1].push((neg_values.astype(self.value_dtype), neg_counts))
        self.num_pos, self.num_neg = num_pos, num_neg

    def state_dict(self) -> dict[str, np.ndarray]:
        pos_values, pos_counts, neg_values, neg_counts = self.class_arrays()
        return {
            "pos_values": pos_values.copy(),
            "pos_counts": pos_counts.copy(),
            "neg_values": neg_values.copy(),
            "neg_counts": neg_counts.copy(),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        other = _ExactState()
        pos_values, neg_values = np.asarray(state["pos_values"]), np.asarray(state["neg_values"])
        pos_counts = np.asarray(state["pos_counts"]).astype(np.int64)
        neg_counts = np.asarray(state["neg_counts"]).astype(np.int64)
        other.num_pos, other.num_neg = int(pos_counts.sum()), int(neg_counts.sum())
        dtype = _value_dtype(pos_values.dtype)
        if other._needs_generic(dtype, other.num_pos, other.num_neg):
            other.value_dtype = dtype
            other.generic = (_Runs(_merge_counts), _Runs(_merge_counts))
            other.generic[0].push((pos_values.astype(dtype), pos_counts))
            other.generic[1].push((neg_values.astype(dtype), neg_counts))
        else:
            runs = []
            for values, counts, anomaly in ((neg_values, neg_counts, False), (pos_values, pos_counts, True)):
                run = float32_to_keys(values).astype(np.uint64) << _KEY_SHIFT
                run |= counts.astype(np.uint64)
                runs.append(run | _CLASS_BIT if anomaly else run)
            other.packed.push(_merge_packed(*runs))
        self.merge(other)

    @property
    def nbytes(self) -> int:
        if self.generic is not None:
            return self.generic[0].nbytes + self.generic[1].nbytes
        return self.packed.nbytes

    def compute(self, curve_points: int = 0) -> dict[str, Any]:
        if self.generic is not None:
            chunks = _class_array_chunks(*self.class_arrays())
        else:
            packed = self.packed.compact()
            chunks = _packed_chunks(packed if packed is not None else np.zeros(0, np.uint64))
        return exact_curve_metrics(chunks, self.num_pos, self.num_neg, curve_points=curve_points)


CurveChunk = tuple[np.ndarray, np.ndarray, np.ndarray]


def _packed_chunks(packed: np.ndarray) -> Iterator[CurveChunk]:
    """(thresholds, anomaly counts, inlier counts) per distinct score, descending, a chunk at a time."""
    end = packed.size
    while end > 0:
        start = max(end - _SWEEP_CHUNK, 0)
        # Never split a score's (inlier, anomaly) pair of entries between two chunks.
        if start > 0 and packed[start] >> _KEY_SHIFT == packed[start - 1] >> _KEY_SHIFT:
            start -= 1
        chunk = packed[start:end][::-1]
        end = start
        keys = chunk >> _KEY_SHIFT
        anomaly = (chunk & _CLASS_BIT) != 0
        counts = (chunk & _COUNT_MASK).astype(np.int64)
        first = np.concatenate(([True], keys[1:] != keys[:-1]))
        group = np.cumsum(first) - 1
        pos = np.zeros(int(group[-1]) + 1, np.int64)
        neg = np.zeros_like(pos)
        pos[group[anomaly]] = counts[anomaly]
        neg[group[~anomaly]] = counts[~anomaly]
        yield keys_to_float32(keys[first]), pos, neg


def _class_array_chunks(
    pos_values: np.ndarray, pos_counts: np.ndarray, neg_values: np.ndarray, neg_counts: np.ndarray
) -> Iterator[CurveChunk]:
    """Same as :func:`_packed_chunks` from per-class sorted distinct values and counts."""
    pos_end, neg_end = pos_values.size, neg_values.size
    while pos_end > 0 or neg_end > 0:
        # Lower bound: the larger of the two arrays' chunk-th value from the top, so that neither contributes
        # more than a chunk; it is an actual value, so every iteration makes progress.
        bounds = [
            values[end - _SWEEP_CHUNK]
            for values, end in ((pos_values, pos_end), (neg_values, neg_end))
            if end > _SWEEP_CHUNK
        ]
        pos_start = int(np.searchsorted(pos_values[:pos_end], max(bounds))) if bounds else 0
        neg_start = int(np.searchsorted(neg_values[:neg_end], max(bounds))) if bounds else 0
        pos_part, neg_part = pos_values[pos_start:pos_end], neg_values[neg_start:neg_end]
        union = np.union1d(pos_part, neg_part)
        pos = np.zeros(union.size, np.int64)
        neg = np.zeros(union.size, np.int64)
        pos[np.searchsorted(union, pos_part)] = pos_counts[pos_start:pos_end]
        neg[np.searchsorted(union, neg_part)] = neg_counts[neg_start:neg_end]
        pos_end, neg_end = pos_start, neg_start
        yield union[::-1], pos[::-1], neg[::-1]


def exact_curve_metrics(chunks: Iterable[CurveChunk], num_pos: int, num_neg: int,
                        curve_points: int = 0) -> dict[str, Any]:
    """Exact AuPRC, AUROC, FPR95 and best F1 from per-distinct-score counts, swept from the highest score down.

    ``chunks`` yields ``(thresholds, anomaly_counts, inlier_counts)`` for consecutive groups of distinct scores in
    descending order. The curve has one operating point per distinct score (predict ``score >= threshold``), as
    scikit-learn's ``_binary_clf_curve``:

    * ``auprc`` = sum over operating points of (R_n - R_{n-1}) * P_n (``average_precision_score``, no
      interpolation);
    * ``auroc`` = trapezoidal area under the ROC curve starting at (0, 0) (``roc_auc_score``);
    * ``fpr95`` = FPR at the first operating point whose TPR (``tp / num_pos`` in float64, as scikit-learn) is
      >= 0.95 — the Fishyscapes ``calculate_metrics_perpixAP`` convention, i.e. ``fpr[np.searchsorted(tpr, 0.95)]``
      on ``roc_curve(drop_intermediate=False)``; ``fpr95_threshold`` is that point's score;
    * ``fpr95_interpolated`` = the ROC curve linearly interpolated at TPR 0.95 between the last operating point with
      TPR <= 0.95 and the next one (the FPR of the former when its TPR is exactly 0.95): ``ood_metrics``'
      ``fpr_at_95_tpr``, which Mask2Anomaly's evaluation script reports. It differs from ``fpr95`` when the ROC step
      across TPR 0.95 is not vertical (ties between anomaly and inlier scores, e.g. 0.95 instead of 1.0 for a
      constant score);
    * ``best_f1`` = max of ``2 tp / (2 tp + fp + fn)`` over the operating points, ``best_f1_threshold`` its score
      (the lowest one among exact ties: integer numerator and denominator make equal F1 values compare equal).

    Undefined values (no anomaly pixel: all of them; no inlier pixel: AUROC and the FPR95s) are NaN. With
    ``curve_points`` > 0 the result also holds ``curve``: the curve thinned to a ``curve_points`` grid
    (:class:`~mask2anomaly_eval.metrics.common.CurvePoints`), for plotting.
    """
    if num_pos + num_neg == 0:
        raise ValueError("no valid pixel was added (every pixel is void or no image was added)")
    if num_pos == 0 or num_neg == 0:
        undefined = "AuPRC, AUROC, FPR95 and best F1 are" if num_pos == 0 else "AUROC and FPR95 are"
        logger.warning(f"pixel metrics over {num_pos} anomaly and {num_neg} inlier pixels: {undefined} undefined (NaN)")
    nan = float("nan")
    ap_sum = auc_twice = 0.0
    fpr95 = fpr95_threshold = fpr95_tpr = fpr95_interpolated = nan
    best_f1, best_f1_threshold = -1.0, nan
    tp_carry = fp_carry = num_distinct = 0
    curve = CurvePoints(num_pos, num_neg, curve_points) if curve_points > 0 else None
    for thresholds, new_tp, new_fp in chunks:
        num_distinct += thresholds.size
        tp = np.cumsum(new_tp, dtype=np.float64)
        tp += tp_carry
        fp = np.cumsum(new_fp, dtype=np.float64)
        fp += fp_carry
        if curve is not None:
            curve.add(tp, fp, thresholds)
        # Counts stay below 2**53, so float64 holds them exactly.
        precision = tp / (tp + fp)
        ap_sum += float(np.dot(new_tp, precision))
        tp_before = np.empty_like(tp)
        tp_before[0] = tp_carry
        tp_before[1:] = tp[:-1]
        tp_before += tp
        auc_twice += float(np.dot(new_fp, tp_before))
        if num_pos > 0:
            if np.isnan(fpr95):
                tpr = tp / num_pos
                index = int(np.searchsorted(tpr, TPR_TARGET))
                if index < tpr.size:
                    fpr95 = float(fp[index] / num_neg) if num_neg else nan
                    fpr95_tpr, fpr95_threshold = float(tpr[index]), float(thresholds[index])
            if np.isnan(fpr95_interpolated) and num_neg:
                tpr = tp / num_pos
                above = int(np.searchsorted(tpr, TPR_TARGET, side="right"))
                if above < tpr.size:
                    # The point before is the previous chunk's last one (or the curve's (0, 0)) at a chunk start.
                    tp_below, fp_below = (tp[above - 1], fp[above - 1]) if above else (tp_carry, fp_carry)
                    tpr_below, fpr_below = tp_below / num_pos, fp_below / num_neg
                    # np.interp's formula, so that the rounding is the same
                    slope = (fp[above] / num_neg - fpr_below) / (tpr[above] - tpr_below)
                    fpr95_interpolated = float(slope * (TPR_TARGET - tpr_below) + fpr_below)
            f1 = 2.0 * tp
            f1 /= tp + fp + num_pos
            index = f1.size - 1 - int(np.argmax(f1[::-1]))  # last maximum = lowest threshold among ties
            if f1[index] >= best_f1:
                best_f1, best_f1_threshold = float(f1[index]), float(thresholds[index])
        tp_carry, fp_carry = float(tp[-1]), float(fp[-1])
    if num_pos == 0:
        auprc = auroc = best_f1 = nan
    else:
        auprc = ap_sum / num_pos
        auroc = auc_twice / (2.0 * num_pos * num_neg) if num_neg else nan
    result = {
        "auprc": auprc,
        "fpr95": fpr95,
        "auroc": auroc,
        "best_f1": best_f1,
        "best_f1_threshold": best_f1_threshold,
        "fpr95_threshold": fpr95_threshold,
        "fpr95_tpr": fpr95_tpr,
        "fpr95_interpolated": fpr95_interpolated,
        "num_pos": int(num_pos),
        "num_neg": int(num_neg),
        "num_distinct_scores": num_distinct,
    }
    if curve is not None:
        result["curve"] = curve.result()
    return result
