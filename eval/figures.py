"""Pictures of an evaluation: the pooled PR and ROC curves as PNGs (AuPRC in the legend and the PR area shaded,
the FPR95 operating point marked on both), and heatmaps of the worst and best images (``--visualize K``).

matplotlib (the ``[eval]`` extra) is imported only here and only when a curve is drawn; the model's remote code
never imports this module. Heatmaps use the model package's own renderer (`modeling_mask2anomaly.visualize`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modeling_mask2anomaly.atomic_io import write_atomically
from modeling_mask2anomaly.visualize import default_score_range, render_heatmap


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("curve pictures need matplotlib: pip install 'mask2anomaly[eval]'") from None
    matplotlib.use("Agg", force=True)  # files only, no display
    from matplotlib import pyplot

    return pyplot


def _save(figure: Any, path: Path) -> None:
    write_atomically(path, lambda stream: figure.savefig(stream, format="png", dpi=120))


def plot_curves(curve: Mapping[str, Sequence[float]], metrics: Mapping[str, Any], title: str,
                pr_path: str | os.PathLike, roc_path: str | os.PathLike) -> tuple[Path, Path]:
    """Draw the PR curve (recall, precision) and the ROC curve (FPR, TPR) of a pooled ``curve`` (as
    ``PixelMetricAccumulator.compute(curve_points=...)`` returns it) into two PNG files.

    ``metrics`` gives ``auprc``, ``auroc``, ``fpr95`` and ``fpr95_tpr`` (fractions; None where undefined): AuPRC and
    AUROC go in the legends, the FPR95 point (first operating point with TPR >= 0.95) is marked on both curves.
    """
    plt = _pyplot()
    tpr = np.asarray(curve["tpr"], np.float64)
    fpr = np.asarray(curve["fpr"], np.float64)
    precision = np.asarray(curve["precision"], np.float64)
    if tpr.size == 0:
        raise ValueError(f"{title}: the curve has no point; expected the result of compute(curve_points=...)")
    # Start both curves where nothing is predicted: the PR curve at (0, precision of the first point).
    recall_line = np.concatenate([[0.0], tpr])
    precision_line = np.concatenate([[precision[0]], precision])
    fpr_line, tpr_line = np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])

    def percent(key: str) -> str:
        value = metrics.get(key)
        return "undefined" if value is None or not np.isfinite(value) else f"{100 * value:.2f}%"

    fpr95 = metrics.get("fpr95")
    fpr95_tpr = metrics.get("fpr95_tpr") or 0.95
    marked = fpr95 is not None and np.isfinite(fpr95)
    index95 = int(np.searchsorted(tpr, fpr95_tpr - 1e-12)) if marked else 0
    paths = Path(pr_path), Path(roc_path)

    figure, axes = plt.subplots(figsize=(5.2, 4.6))
    axes.step(recall_line, precision_line, where="pre", color="#1f4e9c", lw=1.8,
              label=f"PR curve (AuPRC {percent('auprc')})")
    axes.fill_between(recall_line, precision_line, step="pre", color="#1f4e9c", alpha=0.15)
    if marked and index95 < tpr.size:
        axes.plot([tpr[index95]], [precision[index95]], "o", color="#d62728", ms=7,
                  label=f"TPR {100 * fpr95_tpr:.1f}% point (FPR {percent('fpr95')})")
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall (TPR)", ylabel="precision", title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=9)
    figure.tight_layout()
    _save(figure, paths[0])
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(5.2, 4.6))
    axes.plot(fpr_line, tpr_line, color="#1f4e9c", lw=1.8, label=f"ROC curve (AUROC {percent('auroc')})")
    axes.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    axes.axhline(0.95, ls="--", color="#d62728", lw=0.8, alpha=0.6)
    if marked:
        axes.plot([fpr95], [fpr95_tpr], "o", color="#d62728", ms=7, label=f"FPR95 {percent('fpr95')}")
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate", title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=9)
    figure.tight_layout()
    _save(figure, paths[1])
    plt.close(figure)
    return paths


def write_heatmaps(entries: Sequence[tuple[float, int, str, np.ndarray, np.ndarray]], output_dir: str | os.PathLike,
                   prefix: str, scorer: str, threshold: float | None = None) -> list[Path]:
    """One heatmap PNG per ``(auprc, index, name, image, anomaly_map)`` entry, named
    ``<prefix>-<rank>-<image stem>.png`` (rank from 1), drawn by `modeling_mask2anomaly.visualize.render_heatmap`
    on the scorer's colour scale."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank, (_, _, name, image, anomaly_map) in enumerate(entries, start=1):
        vmin, vmax = default_score_range(anomaly_map, scorer)
        picture = render_heatmap(image, anomaly_map, vmin, vmax, threshold=threshold)
        path = output_dir / f"{prefix}-{rank}-{Path(name).stem}.png"
        write_atomically(path, lambda stream, picture=picture: picture.save(stream, format="PNG"))
        paths.append(path)
    return paths


__all__ = ["plot_curves", "write_heatmaps"]
