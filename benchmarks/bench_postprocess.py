"""Full-resolution anomaly post-processing: the processor's block-wise rendering vs a naive whole-image version.

Setting (defaults): 100 queries, 19 classes, mask logits 256 x 512 (padded input 1024 x 2048), un-padded size and
output size 1024 x 2048, refinement on with several confident "stuff" queries so that it applies. The naive side
does what the official code does: upsample all mask logits at once, sigmoid, class-weighted sum, crop, resize,
score, refine.

Each measurement runs in a fresh subprocess (`--worker ours|naive`), so that peak memory is that process's
`ru_maxrss` minus its value once the inputs are built (tracemalloc does not see torch's allocations). The two sides
alternate, `--repeats` times each; medians are reported with the ratios and the maximum absolute difference of the
maps. With `--device cuda` the inputs live on the GPU and peak memory is `torch.cuda.max_memory_allocated` above
what the inputs hold.

    python benchmarks/bench_postprocess.py [--repeats 5] [--threads 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

NUM_QUERIES, NUM_CLASSES = 100, 19
MASK_SIZE = (256, 512)
OUTPUT_SIZE = (1024, 2048)
STUFF_CLASSES = (2, 8, 10)  # building, vegetation, sky: refinement classes


def build_inputs(seed: int = 0) -> SimpleNamespace:
    """Class logits (1, Q, C+1) with a few confident stuff queries, smooth mask logits (1, Q, 256, 512)."""
    gen = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(1, NUM_QUERIES, NUM_CLASSES + 1, generator=gen) * 2
    for q, c in enumerate(STUFF_CLASSES):  # three confident stuff queries -> refinement applies
        class_logits[0, q, c] += 15
    coarse = torch.randn(1, NUM_QUERIES, MASK_SIZE[0] // 16, MASK_SIZE[1] // 16, generator=gen) * 6
    mask_logits = F.interpolate(coarse, size=MASK_SIZE, mode="bilinear", align_corners=False)
    mask_logits += torch.randn(mask_logits.shape, generator=gen)
    mask_logits[0, : len(STUFF_CLASSES)] -= 4  # the stuff masks cover part of the image, not all of it
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits.contiguous())


def naive_anomaly(outputs: SimpleNamespace, valid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Whole-image reference: every mask upsampled at once (official semantic_inference + sem_seg_postprocess)."""
    probs = outputs.class_queries_logits[0].softmax(-1)
    masks = outputs.masks_queries_logits
    padded = (4 * masks.shape[-2], 4 * masks.shape[-1])
    up = F.interpolate(masks, size=padded, mode="bilinear", align_corners=False)[0].sigmoid()
    channels = [torch.einsum("qc,qhw->chw", probs[:, :-1], up)]
    scores, labels = probs.max(-1)
    keep = (scores > 0.95) & (labels >= 2) & (labels <= 10)
    if keep.sum() > 1:
        channels.append(scores[keep].view(-1, 1, 1) * up[keep])
    sem = torch.cat(channels)[:, : valid[0], : valid[1]]
    sem = F.interpolate(sem[None], size=target, mode="bilinear", align_corners=False)[0]
    anomaly = 1 - sem[:NUM_CLASSES].max(0).values
    if keep.sum() > 1:
        anomaly = anomaly * (sem[NUM_CLASSES:].max(0).values < 0.5)
    return anomaly


def worker(side: str, out_path: str, runs: int, device: torch.device) -> None:
    outputs = build_inputs()
    outputs = SimpleNamespace(**{name: value.to(device) for name, value in vars(outputs).items()})
    if side == "ours":
        from modeling_mask2anomaly.image_processing_mask2anomaly import Mask2AnomalyImageProcessor

        processor = Mask2AnomalyImageProcessor(do_resize=False)

        def run() -> torch.Tensor:
            return processor.post_process_anomaly_segmentation(outputs, [OUTPUT_SIZE], image_sizes=[OUTPUT_SIZE])[0]
    else:

        def run() -> torch.Tensor:
            return naive_anomaly(outputs, OUTPUT_SIZE, OUTPUT_SIZE)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        anomaly = run()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        del anomaly
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    np.save(out_path, run().cpu().numpy())
    # the output map itself (8 MiB) is counted on both sides
    json.dump({"times": times, "peak_extra_mb": (peak - baseline) / 2**20}, sys.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="subprocesses per side, alternating")
    parser.add_argument("--runs", type=int, default=2, help="timed runs inside each subprocess (median kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the workers")
    parser.add_argument("--device", default="cpu", help="where the inputs live and the work runs")
    parser.add_argument("--worker", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:  # the parent has checked the device; the workers import nothing they do not measure
        worker(args.worker, args.out, args.runs, torch.device(args.device))
        return
    from modeling_mask2anomaly.inference import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))

    results = {"ours": [], "naive": []}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for side in ("ours", "naive") if repeat % 2 == 0 else ("naive", "ours"):
                command = [sys.executable, os.path.abspath(__file__), "--worker", side, "--runs", str(args.runs),
                           "--threads", str(args.threads), "--device", str(device), "--out", os.path.join(folder, f"{side}.npy")]
                done = subprocess.run(command, check=True, capture_output=True, text=True)
                report = json.loads(done.stdout.strip().splitlines()[-1])
                results[side].append((statistics.median(report["times"]), report["peak_extra_mb"]))
        ours_map = np.load(os.path.join(folder, "ours.npy"))
        naive_map = np.load(os.path.join(folder, "naive.npy"))

    summary = {}
    for side, rows in results.items():
        summary[side] = (statistics.median(t for t, _ in rows), statistics.median(m for _, m in rows))
    print(f"setting: {NUM_QUERIES} queries, {NUM_CLASSES} classes, masks {MASK_SIZE[0]}x{MASK_SIZE[1]}, padded "
          f"{4 * MASK_SIZE[0]}x{4 * MASK_SIZE[1]}, output {OUTPUT_SIZE[0]}x{OUTPUT_SIZE[1]}, refinement on, "
          f"device {device}, {args.threads} threads, {args.repeats} subprocesses x {args.runs} runs per side")
    for side in ("ours", "naive"):
        times = ", ".join(f"{t:.3f}" for t, _ in results[side])
        print(f"{side:>5}: median time {summary[side][0]:.3f} s ({times}), median peak extra memory "
              f"{summary[side][1]:.1f} MiB")
    print(f"time ratio ours/naive: {summary['ours'][0] / summary['naive'][0]:.3f}")
    print(f"peak extra memory ratio ours/naive: {summary['ours'][1] / summary['naive'][1]:.3f}")
    print(f"max abs difference of the anomaly maps: {np.abs(ours_map - naive_map).max():.3g} "
          f"(refined pixels: {(naive_map == 0).mean():.1%})")


if __name__ == "__main__":
    main()
