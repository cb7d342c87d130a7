"""Pixel-level anomaly-segmentation metrics on pooled valid pixels, as streaming accumulators.

Every pixel whose label is not void (255) takes part; label 1 is the positive (anomaly) class, 0 the negative.
The metrics are AuPRC (average precision), FPR at 95% TPR and AUROC, plus the best pixel F1 and its threshold
(the threshold the component metrics use). Images are added one at a time and accumulators merge across
processes, so the evaluation never holds the pooled pixel array. Three modes:

* ``"exact"`` — equal to scikit-learn (``average_precision_score``, ``roc_auc_score``) and to the Fishyscapes
  FPR95 convention (the first ROC operating point with TPR >= 0.95 on the curve with one point per distinct score)
  up to float rounding. The state keeps, per class, the sorted distinct scores with their pixel counts: ties are
  collapsed, so memory grows with the number of distinct score values (bounded by the float32 values that occur),
  not with the number of pixels.
* ``"smiyc"`` — the SegmentMeIfYouCan benchmark's ``PixBinaryClass`` (768 dynamic per-frame bins,
  ``bin_strategy='percentiles'``), reproducing its conventions and quirks, see :class:`_SmiycDynamicState`.
* ``"smiyc_uniform"`` — the benchmark's ``PixBinaryClass-uniThr`` variant (4096 uniform bins on [-0.01, 1.01]).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Literal

import numpy as np
from transformers.utils import logging


logger = logging.get_logger(__name__)

PixelMode = Literal["exact", "smiyc", "smiyc_uniform"]
PIXEL_MODES: tuple[str, ...] = ("exact", "smiyc", "smiyc_uniform")
_MODE_CODES = {mode: code for code, mode in enumerate(PIXEL_MODES)}

VOID_LABEL = 255
# SegmentMeIfYouCan `PixBinaryClass` / `PixBinaryClass-uniThr` settings (metrics/pixel_classification.py).
SMIYC_DYNAMIC_BINS = 768
SMIYC_UNIFORM_BINS = 4096
SMIYC_UNIFORM_RANGE = (-0.01, 1.01)
TPR_TARGET = 0.95

# Distinct scores per chunk of the final sweep: bounds compute()'s temporaries (about a dozen arrays of this length).
_SWEEP_CHUNK = 1 << 18
# Entries per chunk of the in-place duplicate removal when two exact-mode runs merge.
_MERGE_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------------------
# Input checking (shared with the component metrics)
# --------------------------------------------------------------------------------------------------------------


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

    def compute(self) -> dict[str, Any]:
        if self.generic is not None:
            chunks = _class_array_chunks(*self.class_arrays())
        else:
            packed = self.packed.compact()
            chunks = _packed_chunks(packed if packed is not None else np.zeros(0, np.uint64))
        return exact_curve_metrics(chunks, self.num_pos, self.num_neg)


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


def exact_curve_metrics(chunks: Iterable[CurveChunk], num_pos: int, num_neg: int) -> dict[str, Any]:
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

    Undefined values (no anomaly pixel: all of them; no inlier pixel: AUROC and the FPR95s) are NaN.
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
    for thresholds, new_tp, new_fp in chunks:
        num_distinct += thresholds.size
        tp = np.cumsum(new_tp, dtype=np.float64)
        tp += tp_carry
        fp = np.cumsum(new_fp, dtype=np.float64)
        fp += fp_carry
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
    return {
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


# --------------------------------------------------------------------------------------------------------------
# SegmentMeIfYouCan modes
# --------------------------------------------------------------------------------------------------------------


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
    thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray, num_pos: int, num_neg: int
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
    return {
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

    def compute(self) -> dict[str, Any]:
        if not self.frames:
            raise ValueError("no valid pixel was added (every pixel is void or no image was added)")
        thresholds = np.concatenate([f[0][::-1] for f in self.frames])
        tp_rel = np.concatenate([f[1][::-1] for f in self.frames])
        fp_rel = np.concatenate([f[2][::-1] for f in self.frames])
        order = np.argsort(thresholds)[::-1]
        thresholds = thresholds[order]
        tp = np.cumsum(tp_rel[order].astype(np.float64))
        fp = np.cumsum(fp_rel[order].astype(np.float64))
        result = smiyc_curve_metrics(thresholds, tp, fp, self.num_pos, self.num_neg)
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

    def compute(self) -> dict[str, Any]:
        if self.edges is None:
            raise ValueError("no valid pixel was added (every pixel is void or no image was added)")
        tp = np.cumsum(self.tp_hist[::-1]).astype(np.float64)
        fp = np.cumsum(self.fp_hist[::-1]).astype(np.float64)
        thresholds = self.edges[::-1][1:]
        return smiyc_curve_metrics(thresholds, tp, fp, self.num_pos, self.num_neg)


# --------------------------------------------------------------------------------------------------------------
# Public accumulator
# --------------------------------------------------------------------------------------------------------------


class PixelMetricAccumulator:
    """Streaming pixel metrics: ``add`` one (score map, label map) at a time, ``merge`` across processes, ``compute``.

    Args:
        mode: ``"exact"`` (scikit-learn / Fishyscapes values), ``"smiyc"`` (SegmentMeIfYouCan ``PixBinaryClass``,
            768 dynamic bins per frame) or ``"smiyc_uniform"`` (``PixBinaryClass-uniThr``, 4096 uniform bins).
        cast_float16: round scores to float16 before anything else, as the SMIYC pipeline does when it stores
            submissions (``Evaluation.save_output``); off by default.

    Scores are any real dtype (float32 is stored as such; float64 and wide integers are kept in float64 so that
    the exact mode sees the same ties as scikit-learn). Labels: 0 inlier, 1 anomaly, 255 void (ignored).

    ``compute()`` returns a dict with ``auprc``, ``fpr95``, ``auroc``, ``best_f1``, ``best_f1_threshold``,
    ``fpr95_threshold``, ``num_pos``, ``num_neg`` (and mode-specific extras), fractions in [0, 1] like scikit-learn.
    For ``accelerate``, the accumulator pickles (``gather_object``) and ``state_dict()`` holds only numpy arrays
    (``torch.from_numpy``-able); ``PixelMetricAccumulator.from_state_dict`` rebuilds it.
    """

    def __init__(self, mode: PixelMode = "exact", *, cast_float16: bool = False) -> None:
        if mode not in PIXEL_MODES:
            raise ValueError(f"unknown pixel metric mode {mode!r}; expected one of {PIXEL_MODES}")
        self.mode: str = mode
        self.cast_float16 = cast_float16
        self.num_images = 0
        self._state = self._new_state()

    def _new_state(self) -> _ExactState | _SmiycDynamicState | _SmiycUniformState:
        if self.mode == "exact":
            return _ExactState()
        if self.mode == "smiyc":
            return _SmiycDynamicState()
        return _SmiycUniformState()

    def add(self, scores: Any, labels: Any) -> None:
        """Add one image: ``scores`` (H, W) real anomaly scores, ``labels`` (H, W) with 0/1/255."""
        scores, labels = check_frame(scores, labels)
        if self.cast_float16:
            scores = scores.astype(np.float16)
        positives, negatives = split_by_class(scores, labels)
        self._state.add(positives, negatives)
        self.num_images += 1

    def add_batch(self, scores: Iterable[Any], labels: Iterable[Any]) -> None:
        """Add several images (sequences of score maps and label maps, sizes may differ between images)."""
        scores, labels = list(scores), list(labels)
        if len(scores) != len(labels):
            raise ValueError(f"got {len(scores)} score maps but {len(labels)} label maps; expected as many of each")
        for frame_scores, frame_labels in zip(scores, labels):
            self.add(frame_scores, frame_labels)

    def merge(self, other: PixelMetricAccumulator) -> PixelMetricAccumulator:
        """Add everything ``other`` has accumulated into this accumulator (in place); returns ``self``."""
        if not isinstance(other, PixelMetricAccumulator):
            raise ValueError(f"can only merge a PixelMetricAccumulator, got {type(other).__name__}")
        if other.mode != self.mode:
            raise ValueError(
                f"cannot merge a {other.mode!r} accumulator into a {self.mode!r} one; expected the same mode"
            )
        self._state.merge(other._state)
        self.num_images += other.num_images
        return self

    def compute(self) -> dict[str, Any]:
        """Metrics over every pixel added so far (the accumulator is left unchanged)."""
        if self.num_images == 0:
            raise ValueError("no image was added; call add(scores, labels) first")
        result = self._state.compute()
        result["mode"] = self.mode
        result["num_images"] = self.num_images
        return result

    def reset(self) -> None:
        self.num_images = 0
        self._state = self._new_state()

    def state_dict(self) -> dict[str, np.ndarray]:
        """The accumulated state as numpy arrays only (for ``accelerate``'s gather or saving)."""
        state = self._state.state_dict()
        state["mode_code"] = np.array(_MODE_CODES[self.mode], np.int64)
        state["num_images"] = np.array(self.num_images, np.int64)
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, cast_float16: bool = False) -> PixelMetricAccumulator:
        """Rebuild an accumulator from :meth:`state_dict` (numpy arrays or CPU tensors)."""
        state = {key: to_numpy(value) for key, value in state.items()}
        accumulator = cls(PIXEL_MODES[int(state["mode_code"])], cast_float16=cast_float16)
        accumulator._state.load_state_dict(state)
        accumulator.num_images = int(state["num_images"])
        return accumulator

    @property
    def state_nbytes(self) -> int:
        """Bytes held by the exact mode's distinct-score runs (for memory checks); 0 for the binned modes."""
        return self._state.nbytes if self.mode == "exact" else 0

    def __repr__(self) -> str:
        return f"PixelMetricAccumulator(mode={self.mode!r}, num_images={self.num_images})"
