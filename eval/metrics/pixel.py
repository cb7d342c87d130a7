"""Pixel-level anomaly-segmentation metrics on pooled valid pixels, as streaming accumulators.

Every pixel whose label is not void (255) takes part; label 1 is the positive (anomaly) class, 0 the negative.
The metrics are AuPRC (average precision), FPR at 95% TPR and AUROC, plus the best pixel F1 and its threshold
(the threshold the component metrics use). Images are added one at a time and accumulators merge across
processes, so the evaluation never holds the pooled pixel array. :class:`PixelMetricAccumulator` is the one
public class; each mode's state lives in its own module. Three modes:

* ``"exact"`` (``exact.py``) — equal to scikit-learn (``average_precision_score``, ``roc_auc_score``) and to the
  Fishyscapes FPR95 convention (the first ROC operating point with TPR >= 0.95 on the curve with one point per
  distinct score) up to float rounding. The state keeps, per class, the sorted distinct scores with their pixel counts: ties are
  collapsed, so memory grows with the number of distinct score values (bounded by the float32 values that occur),
  not with the number of pixels.
* ``"smiyc"`` (``smiyc.py``) — the SegmentMeIfYouCan benchmark's ``PixBinaryClass`` (768 dynamic per-frame bins,
  ``bin_strategy='percentiles'``), reproducing its conventions and quirks, see :class:`_SmiycDynamicState`.
* ``"smiyc_uniform"`` — the benchmark's ``PixBinaryClass-uniThr`` variant (4096 uniform bins on [-0.01, 1.01]).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

from .common import check_frame, split_by_class, to_numpy
from .exact import _ExactState
from .smiyc import _SmiycDynamicState, _SmiycUniformState

PixelMode = Literal["exact", "smiyc", "smiyc_uniform"]
PIXEL_MODES: tuple[str, ...] = ("exact", "smiyc", "smiyc_uniform")
_MODE_CODES = {mode: code for code, mode in enumerate(PIXEL_MODES)}


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

    def compute(self, curve_points: int = 0) -> dict[str, Any]:
        """Metrics over every pixel added so far (the accumulator is left unchanged); with ``curve_points`` > 0
        also ``curve`` (``thresholds``, ``tpr``, ``fpr``, ``precision`` lists, highest threshold first), the
        pooled curve thinned to about ``2 * curve_points`` points for plotting."""
        if self.num_images == 0:
            raise ValueError("no image was added; call add(scores, labels) first")
        result = self._state.compute(curve_points)
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
