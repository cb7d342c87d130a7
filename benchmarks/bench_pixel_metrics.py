"""Benchmark: exact pixel metrics (accumulator and `evaluate` module) against scikit-learn on pooled arrays.

Every measurement runs in a fresh subprocess that first builds the same synthetic dataset (float32 score maps that
look like Mask2Anomaly outputs: a smooth logit field, anomaly blobs, pixel noise, 1 - sigmoid, and an exact-zero
"refined" region), then resets the kernel's peak-RSS counter (/proc/self/clear_refs) and measures:

* ``accumulator``: ``PixelMetricAccumulator("exact")``, ``add`` per image, ``compute``;
* ``evaluate``: ``evaluate.load("eval/anomaly_segmentation")``, ``add`` per image, ``compute``;
* ``sklearn``: pool the non-void pixels, ``average_precision_score`` + ``roc_curve(drop_intermediate=False)``.

Time is wall clock of that part; memory is peak RSS during it minus the RSS just before it (the dataset, held by
every side alike, is not counted). Sides alternate (the order rotates every repeat); medians are reported with
the ratios and a check that the three sides give the same AuPRC / AUROC / FPR95. A second section streams images
generated on the fly through the accumulator for several dataset sizes to show that its memory does not grow with
the number of images.

    python benchmarks/bench_pixel_metrics.py            # 26 images of 1024x2048 (51M non-void pixels), 3 repeats
    python benchmarks/bench_pixel_metrics.py --quick    # small run
    python benchmarks/bench_pixel_metrics.py --streaming-only   # only the memory-by-dataset-size section
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIDES = ("sklearn", "accumulator", "evaluate")


def make_frame(index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic frame: float32 scores with millions of distinct values, labels 0/1/255."""
    import torch

    rng = np.random.default_rng(1000 + index)
    low = torch.from_numpy(rng.normal(0.0, 1.5, (1, 1, max(height // 32, 2), max(width // 32, 2))).astype(np.float32))
    field = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    field = field.numpy()
    labels = np.zeros((height, width), np.uint8)
    rows, cols = np.ogrid[:height, :width]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.integers(height // 3, height), rng.integers(0, width)
        radius = rng.integers(max(height // 50, 2), max(height // 8, 3))
        blob = (rows - cy) ** 2 + (cols - cx) ** 2 < radius * radius
        labels[blob] = 1
        field[blob] += rng.uniform(2.0, 6.0)
    logit = field - 4.0 + rng.normal(0.0, 0.7, (height, width)).astype(np.float32)
    confidence = (1.0 / (1.0 + np.exp(logit))).astype(np.float32)
    scores = np.float32(1.0) - confidence
    # Mask refinement sets confidently-covered "stuff" pixels to exactly 0: a large tie, as in real outputs.
    scores[: height // 5, : int(rng.integers(width // 4, width))] = 0.0
    labels[: height // 16] = 255  # void band (e.g. the ego vehicle in real data)
    return scores, labels


def memory_kb() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of this process in kB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


STREAM_VARIANTS = {
    "exact": "exact mode, float32 scores",
    "exact-float16": "exact mode, scores stored as float16 (as SMIYC submissions are)",
    "smiyc": "smiyc mode (the benchmark's 768 per-frame bins), float32 scores",
}


def run_worker(side: str, num_frames: int, height: int, width: int, stream: bool, variant: str = "exact") -> dict:
    """Body of one subprocess measurement (see the module docstring)."""
    from sklearn.metrics import auc, average_precision_score, roc_curve

    from mask2anomaly_eval.metrics import PixelMetricAccumulator

    metric = None
    if side == "evaluate":
        import evaluate

        metric = evaluate.load(str(REPO / "eval" / "anomaly_segmentation"))
    frames = [] if stream else [make_frame(i, height, width) for i in range(num_frames)]
    # Warm-up on a tiny input so that lazy imports and first-call costs are not measured.
    warm = PixelMetricAccumulator()
    warm.add(np.array([0.1, 0.9], np.float32), np.array([0, 1], np.uint8))
    warm.compute()
    average_precision_score([0, 1], [0.1, 0.9])
    if stream:
        make_frame(0, height, width)  # first-call allocations of the generator are not the metric's
    reset_peak()
    baseline, _ = memory_kb()
    start = time.perf_counter()
    state_bytes = None
    if side == "sklearn":
        y = np.concatenate([labels[labels != 255] for _, labels in frames]) == 1
        x = np.concatenate([scores[labels != 255] for scores, labels in frames])
        auprc = average_precision_score(y, x)
        fpr, tpr, _ = roc_curve(y, x, drop_intermediate=False)
        result = {"auprc": auprc, "auroc": auc(fpr, tpr), "fpr95": fpr[np.searchsorted(tpr, 0.95)],
                  "num_pixels": int(y.size)}
    elif side == "accumulator":
        accumulator = PixelMetricAccumulator("smiyc" if variant == "smiyc" else "exact")
        for i in range(num_frames):
            if stream:
                scores, labels = make_frame(i, height, width)
                accumulator.add(scores.astype(np.float16) if variant == "exact-float16" else scores, labels)
                del scores, labels
            else:
                accumulator.add(*frames[i])
        result = accumulator.compute()
        state_bytes = accumulator.state_nbytes
        result["num_pixels"] = result["num_pos"] + result["num_neg"]
    else:
        for scores, labels in frames:
            metric.add(prediction=scores, reference=labels)
        result = metric.compute()
        result["num_pixels"] = result["num_pos"] + result["num_neg"]
    elapsed = time.perf_counter() - start
    _, peak = memory_kb()
    return {
        "side": side,
        "seconds": elapsed,
        "peak_mb": (peak - baseline) / 1024,
        "state_mb": None if state_bytes is None else state_bytes / 2**20,
        "auprc": float(result["auprc"]),
        "auroc": float(result["auroc"]),
        "fpr95": float(result["fpr95"]),
        "num_pixels": int(result["num_pixels"]),
    }


def measure(side: str, num_frames: int, height: int, width: int, stream: bool = False, variant: str = "exact") -> dict:
    command = [sys.executable, __file__, "--worker", side, "--frames", str(num_frames), "--height", str(height),
               "--width", str(width), "--variant", variant] + (["--stream"] if stream else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="21 images of 256x512, 1 repeat")
    parser.add_argument("--frames", type=int, default=26)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streaming-only", action="store_true", help="skip the comparison with scikit-learn")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=STREAM_VARIANTS, default="exact", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.frames, args.height, args.width, args.stream, args.variant)))
        return
    if args.quick:
        args.frames, args.height, args.width, args.repeats = 21, 256, 512, 1

    if not args.streaming_only:
        compare(args)
    sizes = (2, 4, 8) if args.quick else (5, 10, 20, 40, 80)
    for variant, title in STREAM_VARIANTS.items():
        print(f"\nstreaming memory, {title} (accumulator; images generated one at a time, nothing held; the peak "
              "includes the generator's temporaries):")
        first = None
        for num_frames in sizes:
            run = measure("accumulator", num_frames, args.height, args.width, stream=True, variant=variant)
            first = first or run
            extra = (run["peak_mb"] - first["peak_mb"]) / max(num_frames - sizes[0], 1)
            print(f"  {num_frames:3d} images ({run['num_pixels']:>11,} px): peak +{run['peak_mb']:6.1f} MB "
                  f"({extra:5.2f} MB per image beyond {sizes[0]}), state {run['state_mb']:5.1f} MB, "
                  f"{run['seconds']:6.2f} s incl. generation", flush=True)


def compare(args: argparse.Namespace) -> None:
    """Side-by-side timing and memory of the three sides on the same dataset."""
    print(f"dataset: {args.frames} float32 score maps of {args.height}x{args.width}; "
          f"{args.repeats} repeat(s) per side, fresh subprocess each, order rotating; cpu count {os.cpu_count()}")
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for repeat in range(args.repeats):
        order = SIDES[repeat % 3:] + SIDES[: repeat % 3]
        for side in order:
            run = measure(side, args.frames, args.height, args.width)
            runs[side].append(run)
            print(f"  repeat {repeat + 1} {side:>11}: {run['seconds']:7.2f} s  peak +{run['peak_mb']:7.1f} MB",
                  flush=True)

    print(f"\nnon-void pixels pooled: {runs['sklearn'][0]['num_pixels']:,}")
    median = {side: {key: statistics.median(r[key] for r in runs[side]) for key in ("seconds", "peak_mb")}
              for side in SIDES}
    print(f"{'side':>12} {'median time':>12} {'median peak':>13} {'speed-up':>9} {'memory':>9}")
    for side in SIDES:
        speed = median["sklearn"]["seconds"] / median[side]["seconds"]
        memory = median[side]["peak_mb"] / median["sklearn"]["peak_mb"]
        print(f"{side:>12} {median[side]['seconds']:10.2f} s {median[side]['peak_mb']:10.1f} MB "
              f"{speed:8.1f}x {memory:8.3f}x")
    worst = max(abs(runs[side][0][key] - runs["sklearn"][0][key])
                for side in SIDES for key in ("auprc", "auroc", "fpr95"))
    print(f"values: AuPRC {runs['sklearn'][0]['auprc']:.12f}  AUROC {runs['sklearn'][0]['auroc']:.12f}  "
          f"FPR95 {runs['sklearn'][0]['fpr95']:.12f};  largest difference to sklearn {worst:.2e}")
    if worst > 1e-9:
        raise SystemExit("results differ from scikit-learn by more than 1e-9")


if __name__ == "__main__":
    main()
