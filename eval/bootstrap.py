"""Bootstrap confidence intervals of the benchmark metrics, from per-image accumulators (no second pass over pixels).

A resample draws ``n`` of the ``n`` evaluated images with replacement (seeded, :func:`resample_indices`); its
metrics are those of the pooled pixels of the drawn images, each image counted as often as it was drawn. The
interval is the percentile interval of the resampled values (``2.5`` and ``97.5`` percentiles for 95 %).

* Pixel metrics (AuPRC, FPR95, AUROC): in ``exact`` mode every image's distinct scores and per-class pixel counts
  (its own exact accumulator) are placed once on a common grid of score levels; a resample's pooled counts are then
  one weighted sum of the images' count vectors and its metrics one sweep of :func:`exact_curve_metrics`. Up to
  ``max_levels`` distinct scores in all, the levels are the scores and the values are those scikit-learn gives on
  the concatenated pixels of the resample; beyond, the levels hold equal numbers of pixels (scores within one tie),
  which keeps a resample's cost bounded at a rounding of about ``1 / max_levels``. The point estimate is always
  exact. In the SMIYC modes a resample merges the images' binned states.
* Component metrics (sIoU, PPV, mean F1): weighted sums of the images' component counts. The component threshold
  stays the one of the full evaluation (re-deriving it per resample would need the pixels again), so the interval
  covers the image sampling at that threshold.

A resample whose metric is undefined (e.g. it drew no anomaly pixel) is left out of that metric's interval; the
result says how many resamples each interval rests on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .metrics import ComponentMetricAccumulator, PixelMetricAccumulator
from .metrics.exact import exact_curve_metrics

PIXEL_KEYS: tuple[str, ...] = ("auprc", "fpr95", "auroc")
COMPONENT_KEYS: tuple[str, ...] = ("siou", "ppv", "mean_f1")
_SWEEP = 1 << 18
# Score levels of the exact-mode bootstrap: up to this many distinct scores the resampled values are exact.
DEFAULT_MAX_LEVELS = 1 << 14  # (images x levels) float64 per class: 256 MB at 1000 images


def resample_indices(num_images: int, num_resamples: int, seed: int = 0) -> np.ndarray:
    """(num_resamples, num_images) image indices drawn with replacement by ``numpy.random.default_rng(seed)``."""
    if num_images < 1 or num_resamples < 1:
        raise ValueError(f"bootstrap of {num_resamples} resample(s) over {num_images} image(s); expected at least "
                         "one of each")
    return np.random.default_rng(seed).integers(0, num_images, size=(num_resamples, num_images))


class _ExactResampler:
    """Pooled exact pixel metrics of a weighted set of images, from the images' exact accumulators.

    Every image's counts are placed on one grid of score levels: the distinct scores of all images when there are
    at most ``max_levels`` of them (the values are then exactly scikit-learn's), otherwise ``max_levels`` levels
    holding about equal numbers of pixels (scores within a level tie, which moves AuPRC/AUROC/FPR95 by about
    ``1 / max_levels``). A resample's pooled counts are a weighted sum of the images' (levels,) count vectors, and
    its metrics one sweep of :func:`exact_curve_metrics` over the levels.
    """

    def __init__(self, states: Sequence[PixelMetricAccumulator], max_levels: int) -> None:
        dicts = [state.state_dict() for state in states]
        grid = np.unique(np.concatenate([d[key] for d in dicts for key in ("pos_values", "neg_values")]))
        level_of = np.arange(grid.size)
        self.exact = grid.size <= max_levels
        if not self.exact:
            mass = np.zeros(grid.size, np.float64)
            for d in dicts:
                for key in ("pos", "neg"):
                    mass += np.bincount(np.searchsorted(grid, d[f"{key}_values"]), weights=d[f"{key}_counts"],
                                        minlength=grid.size)
            # equal-mass levels from the cumulative pixel count; a level's threshold is its highest score
            cumulative = np.cumsum(mass)
            level_of = np.minimum((cumulative - mass) * max_levels // cumulative[-1], max_levels - 1).astype(np.int64)
            level_of = np.unique(level_of, return_inverse=True)[1]
        self.num_levels = int(level_of[-1]) + 1 if grid.size else 0
        # a level's threshold: its highest score (the grid ascends)
        self.thresholds = grid[np.append(np.flatnonzero(np.diff(level_of)), grid.size - 1)] if grid.size else grid
        self.counts = []  # per class, (images, levels) float64
        for key in ("pos", "neg"):
            table = np.zeros((len(dicts), self.num_levels), np.float64)
            for i, d in enumerate(dicts):
                table[i] = np.bincount(level_of[np.searchsorted(grid, d[f"{key}_values"])],
                                       weights=d[f"{key}_counts"], minlength=self.num_levels)
            self.counts.append(table)

    def __call__(self, weights: np.ndarray) -> dict[str, float]:
        # counts and weights are integers, and their products stay below 2**53: float64 holds them exactly
        weights = weights.astype(np.float64)
        pos, neg = (weights @ table for table in self.counts)
        num_pos, num_neg = int(round(pos.sum())), int(round(neg.sum()))
        if num_pos == 0 or num_neg == 0:
            return {key: math.nan for key in PIXEL_KEYS}
        present = (pos > 0) | (neg > 0)  # levels only left-out images have are no operating point
        thresholds, pos, neg = self.thresholds[present], pos[present], neg[present]

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
            for end in range(thresholds.size, 0, -_SWEEP):
                part = slice(max(end - _SWEEP, 0), end)
                yield thresholds[part][::-1], pos[part][::-1], neg[part][::-1]

        result = exact_curve_metrics(chunks(), num_pos, num_neg)
        return {key: float(result[key]) for key in PIXEL_KEYS}


def _binned_resampler(states: Sequence[PixelMetricAccumulator]) -> Callable[[np.ndarray], dict[str, float]]:
    """SMIYC modes: a resample merges each drawn image's (small, binned) state as often as it was drawn."""

    def metrics(weights: np.ndarray) -> dict[str, float]:
        pooled = PixelMetricAccumulator(states[0].mode)  # type: ignore[arg-type]
        for index in np.repeat(np.arange(weights.size), weights.astype(np.int64)):
            pooled.merge(states[index])
        if pooled._state.num_pos == 0 or pooled._state.num_neg == 0:
            return {key: math.nan for key in PIXEL_KEYS}
        result = pooled.compute()
        return {key: float(result[key]) for key in PIXEL_KEYS}

    return metrics


def _component_resampler(states: Sequence[dict[str, np.ndarray]]) -> Callable[[np.ndarray], dict[str, float]]:
    counts = np.stack([state["counts"] for state in states]).astype(np.float64)  # (n, 3, 11)
    sums = np.stack([state["sums"] for state in states])  # (n, 3)
    totals = np.stack([state["totals"] for state in states]).astype(np.float64)  # (n, 3)
    settings = states[0]["settings"]

    def metrics(weights: np.ndarray) -> dict[str, float]:
        weights = weights.astype(np.float64)
        state = {"counts": np.tensordot(weights, counts, axes=1).round().astype(np.int64),
                 "sums": weights @ sums, "totals": (weights @ totals).round().astype(np.int64), "settings": settings}
        result = ComponentMetricAccumulator.from_state_dict(state).compute()
        return {key: float(result[key]) for key in COMPONENT_KEYS}

    return metrics


def bootstrap_metrics(
    pixel_states: Sequence[PixelMetricAccumulator],
    component_states: Sequence[dict[str, np.ndarray]] | None = None,
    *,
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    max_levels: int = DEFAULT_MAX_LEVELS,
    progress: bool = False,
) -> dict[str, Any]:
    """Percentile bootstrap intervals of AuPRC, FPR95, AUROC (and sIoU, PPV, mean F1 with ``component_states``).

    Args:
        pixel_states: one pixel accumulator per evaluated image (all in one mode), in image order.
        component_states: one ``ComponentMetricAccumulator.state_dict()`` per image (same order, same threshold).
        num_resamples: number of resamples ``B``; seed: seed of :func:`resample_indices`.
        confidence: central coverage of the interval (0.95: the 2.5 and 97.5 percentiles).
        max_levels: exact mode: most score levels a resample is swept over (see :class:`_ExactResampler`); the
            result's ``exact`` says whether the distinct scores fitted (values then equal scikit-learn's).

    Returns:
        ``{"num_resamples", "seed", "confidence", "method": "percentile", "intervals": {metric: {"low", "high",
        "mean", "std", "num_defined"}}, "values": {metric: [B values, NaN where undefined]}}``; an interval with
        no defined resample has None bounds.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}; expected a fraction between 0 and 1")
    if not pixel_states:
        raise ValueError("no per-image accumulator to resample; expected one per evaluated image")
    if component_states is not None and len(component_states) != len(pixel_states):
        raise ValueError(f"{len(component_states)} component states for {len(pixel_states)} images; expected one each")
    modes = {state.mode for state in pixel_states}
    if len(modes) != 1:
        raise ValueError(f"per-image accumulators in modes {sorted(modes)}; expected one mode")
    indices = resample_indices(len(pixel_states), num_resamples, seed)
    pixel = _ExactResampler(pixel_states, max_levels) if modes == {"exact"} else _binned_resampler(pixel_states)
    component = _component_resampler(component_states) if component_states else None
    keys = PIXEL_KEYS + (COMPONENT_KEYS if component else ())
    values = {key: np.full(num_resamples, np.nan) for key in keys}
    for b, row in enumerate(tqdm(indices, desc="bootstrap", unit="resample", disable=not progress)):
        weights = np.bincount(row, minlength=len(pixel_states))
        metrics = pixel(weights)
        if component is not None:
            metrics.update(component(weights))
        for key, value in metrics.items():
            values[key][b] = value
    tail = 100 * (1 - confidence) / 2
    intervals = {}
    for key, series in values.items():
        defined = series[np.isfinite(series)]
        if defined.size:
            low, high = np.percentile(defined, [tail, 100 - tail])
            intervals[key] = {"low": float(low), "high": float(high), "mean": float(defined.mean()),
                              "std": float(defined.std(ddof=1)) if defined.size > 1 else 0.0,
                              "num_defined": int(defined.size)}
        else:
            intervals[key] = {"low": None, "high": None, "mean": None, "std": None, "num_defined": 0}
    return {"num_resamples": num_resamples, "seed": seed, "confidence": confidence, "method": "percentile",
            "exact": bool(getattr(pixel, "exact", True)),
            "score_levels": getattr(pixel, "num_levels", None), "intervals": intervals,
            "values": {key: series.tolist() for key, series in values.items()}}


__all__ = ["COMPONENT_KEYS", "DEFAULT_MAX_LEVELS", "PIXEL_KEYS", "bootstrap_metrics", "resample_indices"]
