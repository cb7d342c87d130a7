"""Per-image statistics of an evaluation: one row per image for the per-image CSV (score statistics, anomalous area,
per-image AuPRC / FPR95 / AUROC where the image has both anomaly and inlier pixels), the per-image accumulators that
the bootstrap resamples (so that it never goes over the pixels again), and the K worst and best images for
``--visualize``.

Rows are computed from the same non-void pixels as the pooled metrics (void = label 255 is left out), the
per-image metrics by the exact pixel mode (scikit-learn's values).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .metrics import ComponentMetricAccumulator, PixelMetricAccumulator, check_frame
from .metrics.common import split_by_class


@dataclass
class ImageRecord:
    """One image's row. Scores are over non-void pixels; ``anomalous_area`` is the fraction of non-void pixels
    labelled anomaly; ``auprc``/``fpr95``/``auroc`` are None unless the image has anomaly and inlier pixels.

    ``pixel_state`` / ``component_state`` (kept only for the bootstrap) are this image's own accumulators.
    """

    index: int
    name: str
    height: int
    width: int
    num_valid: int
    num_anomaly: int
    anomalous_area: float | None
    score_mean: float | None
    score_min: float | None
    score_max: float | None
    anomaly_score_mean: float | None
    inlier_score_mean: float | None
    auprc: float | None
    fpr95: float | None
    auroc: float | None
    pixel_state: PixelMetricAccumulator | None = field(default=None, repr=False)
    component_state: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def row(self) -> dict[str, Any]:
        """The CSV/JSON columns (without the accumulators)."""
        values = asdict(self)
        values.pop("pixel_state")
        values.pop("component_state")
        return values


CSV_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ImageRecord) if not f.name.endswith("_state"))


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean(dtype=np.float64)) if values.size else None


def image_record(index: int, name: str, scores: Any, labels: Any, *, keep_state: bool = False,
                 mode: str = "exact") -> ImageRecord:
    """The row of one image ((H, W) scores and 0/1/255 labels); with ``keep_state`` also its pixel accumulator
    in ``mode`` for the bootstrap."""
    scores, labels = check_frame(scores, labels)
    positives, negatives = split_by_class(scores, labels)
    valid = np.concatenate([positives, negatives])
    exact = PixelMetricAccumulator("exact")
    metrics: dict[str, float | None] = {"auprc": None, "fpr95": None, "auroc": None}
    if positives.size and negatives.size:
        exact.add(scores, labels)
        computed = exact.compute()
        metrics = {key: float(computed[key]) if math.isfinite(computed[key]) else None for key in metrics}
    state = None
    if keep_state:
        if mode == "exact" and exact.num_images:
            state = exact
        else:
            state = PixelMetricAccumulator(mode)  # type: ignore[arg-type]
            state.add(scores, labels)
    return ImageRecord(
        index=index, name=name, height=int(labels.shape[0]), width=int(labels.shape[1]),
        num_valid=int(valid.size), num_anomaly=int(positives.size),
        anomalous_area=positives.size / valid.size if valid.size else None,
        score_mean=_mean(valid), score_min=float(valid.min()) if valid.size else None,
        score_max=float(valid.max()) if valid.size else None,
        anomaly_score_mean=_mean(positives), inlier_score_mean=_mean(negatives),
        pixel_state=state, **metrics,
    )


def add_component_frame(total: ComponentMetricAccumulator, scores: Any, labels: Any,
                        record: ImageRecord | None = None) -> None:
    """Add one image to ``total``; with a ``record``, through an accumulator of its own whose state the record
    keeps for the bootstrap (the totals are the same either way: merging adds the same per-image sums)."""
    if record is None:
        total.add(scores, labels)
        return
    own = ComponentMetricAccumulator(total.track, total.threshold, min_pred_size=total.min_pred_size,  # type: ignore
                                     min_gt_size=total.min_gt_size, cast_float16=total.cast_float16)
    own.add(scores, labels)
    total.merge(own)
    record.component_state = own.state_dict()


def per_image_csv(records: Sequence[ImageRecord | Mapping[str, Any]]) -> str:
    """The per-image table as CSV text (header :data:`CSV_COLUMNS`; undefined values empty)."""
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for record in records:
        row = record.row() if isinstance(record, ImageRecord) else dict(record)
        writer.writerow({key: "" if row.get(key) is None else _csv_value(row[key]) for key in CSV_COLUMNS})
    return stream.getvalue()


def _csv_value(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


class ExtremeImages:
    """The ``k`` images with the lowest and the ``k`` with the highest per-image AuPRC seen so far (images without
    a per-image AuPRC are not ranked), each with its image and anomaly map, for ``--visualize``."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.entries: list[tuple[float, int, str, np.ndarray, np.ndarray]] = []

    def add(self, record: ImageRecord, image: np.ndarray, anomaly_map: np.ndarray) -> None:
        if self.k <= 0 or record.auprc is None:
            return
        self.entries.append((record.auprc, record.index, record.name, image, anomaly_map))
        if len(self.entries) > 2 * self.k:
            self.entries = self._selected()

    def merge(self, other: ExtremeImages) -> ExtremeImages:
        self.entries.extend(other.entries)
        self.entries = self._selected()
        return self

    def _selected(self) -> list[tuple[float, int, str, np.ndarray, np.ndarray]]:
        ranked = sorted(self.entries, key=lambda entry: (entry[0], entry[1]))
        if len(ranked) <= 2 * self.k:
            return ranked
        return ranked[: self.k] + ranked[-self.k:]

    def worst_and_best(self) -> tuple[list[tuple[float, int, str, np.ndarray, np.ndarray]],
                                      list[tuple[float, int, str, np.ndarray, np.ndarray]]]:
        """(worst first, best first); an image is in one list only when fewer than 2k images are ranked."""
        ranked = self._selected()
        worst = ranked[: min(self.k, (len(ranked) + 1) // 2)]
        best = ranked[len(worst):][::-1][: self.k]
        return worst, best


__all__ = ["CSV_COLUMNS", "ExtremeImages", "ImageRecord", "add_component_frame", "image_record", "per_image_csv"]
