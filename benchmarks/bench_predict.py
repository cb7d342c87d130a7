"""Throughput of `mask2anomaly-predict`'s code path at Cityscapes resolution, and where the time goes.

Setting: the paper-size model (`Mask2AnomalyConfig.paper()`: ResNet-50, 6-layer deformable pixel decoder, 9
decoder layers, 100 queries; random weights, which cost the same as trained ones) and a folder of 1024 x 2048
PNG road-sized images. Each image goes through exactly what the CLI does per image: `load_image`,
`predict_anomaly` (pre-processing, forward, post-processing; with and without flip TTA) and `write_outputs`
(.npy, heatmap PNG, semantic PNG).

Time is split with forward hooks on the backbone (`pixel_level_module.encoder`), the pixel decoder
(`pixel_level_module.decoder`) and the transformer decoder (`transformer_module`); "pre/post-processing" is
`predict_anomaly` minus the forward passes (resize/normalise and the block-wise anomaly + semantic maps), and
"read" / "write" are the file steps around it. The first image of each setting is a warm-up and is not counted.
`--profile` then runs `torch.profiler` over one more prediction (flip off) and prints the operators that take the
time (self time, top 15), which says why a stage costs what it does.

    python benchmarks/bench_predict.py [--quick] [--images 3] [--threads 2] [--device cpu] [--profile]
    python benchmarks/bench_predict.py --device cuda --images 11 --dtype bfloat16   # GPU, bf16 weights
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modeling_mask2anomaly import (
    Mask2AnomalyConfig,
    Mask2AnomalyForUniversalSegmentation,
    Mask2AnomalyImageProcessor,
    load_image,
    predict_anomaly,
)
from modeling_mask2anomaly.inference import resolve_device
from modeling_mask2anomaly.predict import DTYPES, check_dtype_for_device, output_stems, write_outputs

STAGES = {
    "backbone": lambda m: m.model.pixel_level_module.encoder,
    "pixel decoder": lambda m: m.model.pixel_level_module.decoder,
    "transformer decoder": lambda m: m.model.transformer_module,
}


def road_like_image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth synthetic scene (sky, buildings, road) with noise: PNG-compresses like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 1, height)[:, None, None]
    sky, road = np.array([110, 150, 200]), np.array([90, 80, 90])
    image = np.where(rows < 0.45, sky, road) * np.ones((height, width, 3))
    image[int(0.25 * height):int(0.5 * height), ::97] = [70, 70, 70]
    image += rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


class StageTimer:
    """Wall time spent inside each hooked module (forward pre-hook to forward hook)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.device = device
        self._start: dict[str, float] = {}
        self._handles = []
        for name, get in STAGES.items():
            module = get(model)
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre(self, name: str):
        def hook(module, args):
            self._sync()
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            self._sync()
            self.totals[name] += time.perf_counter() - self._start.pop(name)
        return hook

    def reset(self) -> None:
        self.totals.clear()


@contextmanager
def timed(totals: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    totals[name] += time.perf_counter() - start


def run_setting(model, processor, paths: list[Path], out: Path, flip_tta: bool, device: torch.device,
                timer: StageTimer) -> dict[str, float]:
    """Per-image seconds of each step, averaged over the images after the first (warm-up)."""
    totals: dict[str, float] = defaultdict(float)
    counted = 0
    for index, (path, stem) in enumerate(zip(paths, output_stems(paths))):
        timer.reset()
        step: dict[str, float] = defaultdict(float)
        with timed(step, "read"):
            image = np.asarray(load_image(path))
        with timed(step, "predict"):
            prediction = predict_anomaly(model, processor, [image], flip_tta=flip_tta, device=device)[0]
        with timed(step, "write"):
            write_outputs(out, stem, image, prediction, processor.anomaly_scorer, processor.anomaly_threshold)
        if index == 0 and len(paths) > 1:
            continue  # warm-up: allocator and thread pools
        counted += 1
        forward = sum(timer.totals.values())
        for name in STAGES:
            totals[name] += timer.totals[name]
        totals["pre/post-processing"] += step["predict"] - forward
        totals["read"] += step["read"]
        totals["write"] += step["write"]
    return {name: value / counted for name, value in totals.items()}


def print_profile(model, processor, path: Path, device: torch.device) -> None:
    """Operator-level profile of one prediction (flip off): the top operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    image = np.asarray(load_image(path))
    with profile(activities=activities) as prof:
        predict_anomaly(model, processor, [image], flip_tta=False, device=device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of one prediction (flip off), top operators by {sort_by.replace('_', ' ')}:")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=15, max_name_column_width=40))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3, help="images per setting; the first is a warm-up")
    parser.add_argument("--quick", action="store_true", help="2 images per setting (1 warm-up + 1 timed)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true", help="also print an operator profile of one prediction")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model weights (as the CLI's --dtype)")
    args = parser.parse_args(argv)
    count = 2 if args.quick else max(1, args.images)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        check_dtype_for_device(args.dtype, device)
    except ValueError as err:
        parser.error(str(err))

    torch.manual_seed(0)
    model = Mask2AnomalyForUniversalSegmentation(Mask2AnomalyConfig.paper())
    model = model.to(device=device, dtype=DTYPES[args.dtype]).eval()
    processor = Mask2AnomalyImageProcessor.from_model_config(model.config)
    timer = StageTimer(model, device)
    print(f"model: paper config, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
          f"{count} images of {args.height}x{args.width} per setting ({count - 1 if count > 1 else 1} timed); "
          f"device {device}, {args.dtype}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = []
        for index in range(count):
            path = folder / f"road_{index:03d}.png"
            Image.fromarray(road_like_image(args.height, args.width, index)).save(path)
            paths.append(path)
        for flip_tta in (False, True):
            out = Path(tmp) / f"out_flip{int(flip_tta)}"
            out.mkdir()
            seconds = run_setting(model, processor, paths, out, flip_tta, device, timer)
            total = sum(seconds.values())
            print(f"\nflip TTA {'on ' if flip_tta else 'off'}: {1.0 / total:.3f} images/s ({total:.2f} s per image)")
            for name, value in sorted(seconds.items(), key=lambda item: -item[1]):
                print(f"  {name:<22} {value:7.2f} s  {100 * value / total:5.1f}%")
        if args.profile:
            print_profile(model, processor, paths[-1], device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
