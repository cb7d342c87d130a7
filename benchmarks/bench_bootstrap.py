"""Benchmark: bootstrap intervals from per-image accumulators (`mask2anomaly_eval.bootstrap`) against the naive
resample-and-recompute (concatenate the drawn images' pixels, scikit-learn's AuPRC, AUROC and ROC curve).

Synthetic float32 score maps like those of `bench_pixel_metrics.py` (its `make_frame`): each side computes the
same seeded resamples; time is wall clock of the whole bootstrap (the per-image accumulators' set-up included, not
the evaluation pass that fills them). Printed: seconds per side, the ratio, seconds per resample, and the largest
difference of the resampled values between the sides (0 up to float rounding while the distinct scores fit the
score levels; the levels' rounding beyond).

    python benchmarks/bench_bootstrap.py                 # 10 images of 512x1024, 50 resamples
    python benchmarks/bench_bootstrap.py --quick         # 6 images of 128x256, 20 resamples
    python benchmarks/bench_bootstrap.py --max-levels 1048576   # force the exact grid
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pixel_metrics import make_frame  # noqa: E402

from mask2anomaly_eval.bootstrap import DEFAULT_MAX_LEVELS, bootstrap_metrics, resample_indices  # noqa: E402
from mask2anomaly_eval.per_image import image_record  # noqa: E402


def naive(frames: list[tuple[np.ndarray, np.ndarray]], rows: np.ndarray) -> dict[str, list[float]]:
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    values: dict[str, list[float]] = {"auprc": [], "auroc": [], "fpr95": []}
    valid = [(scores[labels != 255], labels[labels != 255] == 1) for scores, labels in frames]
    for row in rows:
        s = np.concatenate([valid[i][0] for i in row])
        y = np.concatenate([valid[i][1] for i in row])
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        values["auprc"].append(average_precision_score(y, s))
        values["auroc"].append(roc_auc_score(y, s))
        values["fpr95"].append(float(fpr[np.argmax(tpr >= 0.95)]))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--resamples", type=int, default=50)
    parser.add_argument("--max-levels", type=int, default=DEFAULT_MAX_LEVELS)
    parser.add_argument("--quick", action="store_true", help="6 images of 128x256, 20 resamples")
    args = parser.parse_args()
    if args.quick:
        args.images, args.height, args.width, args.resamples = 6, 128, 256, 20
    frames = [make_frame(i, args.height, args.width) for i in range(args.images)]
    records = [image_record(i, str(i), s, l, keep_state=True) for i, (s, l) in enumerate(frames)]

    start = time.perf_counter()
    ours = bootstrap_metrics([r.pixel_state for r in records], num_resamples=args.resamples, seed=0,
                             max_levels=args.max_levels)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reference = naive(frames, resample_indices(len(frames), args.resamples, 0))
    naive_seconds = time.perf_counter() - start

    difference = max(float(np.max(np.abs(np.array(ours["values"][key]) - np.array(reference[key]))))
                     for key in reference)
    pixels = sum(int((labels != 255).sum()) for _, labels in frames)
    print(f"{args.images} images of {args.height}x{args.width} ({pixels / 1e6:.1f} M non-void pixels), "
          f"{args.resamples} resamples, score levels {ours['score_levels']} (exact: {ours['exact']})")
    print(f"{'side':<28}{'seconds':>10}{'per resample':>15}")
    print(f"{'naive (sklearn)':<28}{naive_seconds:>10.2f}{naive_seconds / args.resamples:>15.4f}")
    print(f"{'per-image accumulators':<28}{ours_seconds:>10.2f}{ours_seconds / args.resamples:>15.4f}")
    print(f"ratio naive / ours: {naive_seconds / ours_seconds:.1f}x; largest difference of a resampled value: "
          f"{difference:.2e}")


if __name__ == "__main__":
    main()
