"""Inference backends side by side: transformers' stock Mask2Former form, ours eager, ours compiled, ONNX Runtime and
OpenVINO, each as a ratio to the stock form, in one run on the same image.

Setting: the paper configuration (`Mask2AnomalyConfig.paper()`: ResNet-50, 6-layer deformable pixel decoder, 9
decoder layers, 100 queries; random weights, which cost the same as trained ones). The stock form is transformers'
`Mask2FormerForUniversalSegmentation` of the same architecture (`mask2former_config_from_mask2anomaly`, i.e.
without the background attentions, the official pipeline's equivalent), run through the same backend interface.
The ONNX forms run `model.onnx` written by `modeling_mask2anomaly.export.export_folder` at each size (fixed size,
batch 1), so the export time is part of the set-up, not of the figures.

- default: the forward (`backend(pixel_values)`: what a backend does) per form;
- `--end-to-end`: `predict_anomaly` from the (H, W, 3) uint8 image to the anomaly and semantic maps (pre-processing,
  forward, post-processing; no flip), which is what `mask2anomaly-predict --backend` costs per image.

The forms are timed alternately (one call of each per round, `--repeats` rounds after a warm-up round; the compiled
form compiles in its warm-up, which is timed and printed apart), medians printed with their ratio to the stock
form and the largest anomaly-map difference to ours eager (`--end-to-end`; it must be ~1e-5: the same network). All
forms get `--threads` threads (torch, ONNX Runtime's intra-op pool, OpenVINO's inference threads).

    python benchmarks/bench_backends.py --end-to-end                      # 512x1024 and 1024x2048
    python benchmarks/bench_backends.py --end-to-end --sizes 512x1024 --repeats 3 --forms stock eager onnxruntime
    python benchmarks/bench_backends.py --config tiny --sizes 128x256 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import Mask2FormerForUniversalSegmentation

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation, Mask2AnomalyImageProcessor
from modeling_mask2anomaly.backends import Backend, TorchBackend, load_backend
from modeling_mask2anomaly.export import export_folder
from modeling_mask2anomaly.inference import predict_anomaly
from modeling_mask2anomaly.modeling_mask2anomaly import mask2former_config_from_mask2anomaly

FORMS = ("stock", "eager", "compiled", "onnxruntime", "openvino")


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 512x1024") from err
    if height % 32 or width % 32 or height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"size {text!r}: height and width must be positive multiples of 32")
    return height, width


def road_like_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random (H, W, 3) uint8 image (what a photo compresses like; the cost does not depend on it)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
    rows = np.linspace(0, coarse.shape[0] - 1, height)
    cols = np.linspace(0, coarse.shape[1] - 1, width)
    image = coarse[rows.astype(int)][:, cols.astype(int)]
    return np.clip(image + rng.normal(0, 8, size=image.shape), 0, 255).astype(np.uint8)


def build_forms(config: Mask2AnomalyConfig, forms: list[str], height: int, width: int, folder: Path,
                threads: int) -> tuple[dict[str, Backend], Mask2AnomalyImageProcessor]:
    """The backends of `forms` for one input size; the processor keeps an image of that size as it is."""
    torch.manual_seed(0)
    model = Mask2AnomalyForUniversalSegmentation(config).eval()
    processor = Mask2AnomalyImageProcessor.from_model_config(config, size={"shortest_edge": height,
                                                                           "longest_edge": width})
    backends: dict[str, Backend] = {}
    if "stock" in forms:
        stock = Mask2FormerForUniversalSegmentation(mask2former_config_from_mask2anomaly(config)).eval()
        backends["stock"] = TorchBackend(stock)
    backends["eager"] = TorchBackend(model)  # always: the reference of the map differences
    if "compiled" in forms:
        backends["compiled"] = TorchBackend(model, compile=True)
    runtimes = [form for form in forms if form in ("onnxruntime", "openvino")]
    if runtimes:
        source, exported = folder / f"model-{height}x{width}", folder / f"onnx-{height}x{width}"
        model.save_pretrained(source)
        processor.save_pretrained(source)
        start = time.perf_counter()
        export_folder(source, exported, height, width, verify=())
        print(f"  exported {height}x{width} in {time.perf_counter() - start:.0f} s", flush=True)
        for form in runtimes:
            backends[form], _ = load_backend(exported, form, num_threads=threads)
    ordered = {form: backends[form] for form in forms if form in backends}
    ordered.setdefault("eager", backends["eager"])
    return ordered, processor


def measure(backends: dict[str, Backend], processor: Mask2AnomalyImageProcessor, image: np.ndarray,
            end_to_end: bool, repeats: int) -> tuple[dict[str, list[float]], dict[str, float], dict[str, np.ndarray]]:
    """Alternating timings (seconds) per form, the warm-up time per form, and the anomaly maps (end to end)."""
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    maps: dict[str, np.ndarray] = {}

    def call(form: str) -> Callable[[], None]:
        backend = backends[form]
        if end_to_end:
            def run() -> None:
                maps[form] = predict_anomaly(backend, processor, image, flip_tta=False)[0].anomaly_map
        else:
            def run() -> None:
                backend(pixel_values)
        return run

    runs = {form: call(form) for form in backends}
    warm_up = {}
    for form, run in runs.items():
        start = time.perf_counter()
        run()
        warm_up[form] = time.perf_counter() - start
    times: dict[str, list[float]] = {form: [] for form in runs}
    for _ in range(repeats):
        for form, run in runs.items():
            start = time.perf_counter()
            run()
            times[form].append(time.perf_counter() - start)
    return times, warm_up, maps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--end-to-end", action="store_true",
                        help="time predict_anomaly from the image to the maps (default: the forward only)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(512, 1024), (1024, 2048)],
                        metavar="HxW", help="input sizes (default: 512x1024 1024x2048)")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help="what to time (default: all)")
    parser.add_argument("--config", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up (default: 5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads of every form (default: torch's, %(default)s)")
    args = parser.parse_args(argv)
    forms = list(dict.fromkeys(["stock", *args.forms]))  # the ratios' reference is always timed
    torch.set_num_threads(args.threads)
    config = getattr(Mask2AnomalyConfig, args.config)()
    what = "end to end (image -> maps, no flip)" if args.end_to_end else "forward (pixel_values -> logits)"
    print(f"{args.config} config, {what}; torch {torch.__version__}, {args.threads} threads, "
          f"{args.repeats} alternating rounds; medians")
    with tempfile.TemporaryDirectory() as tmp:
        for height, width in args.sizes:
            print(f"\n{height}x{width}:", flush=True)
            backends, processor = build_forms(config, forms, height, width, Path(tmp), args.threads)
            image = road_like_image(height, width)
            times, warm_up, maps = measure(backends, processor, image, args.end_to_end, args.repeats)
            stock = statistics.median(times["stock"])
            print(f"  {'form':<12} {'median ms':>10} {'x stock':>8} {'warm-up ms':>11}  max |map - eager|")
            for form in times:
                median = statistics.median(times[form])
                difference = (f"{float(np.abs(maps[form] - maps['eager']).max()):.1e}"
                              if form in maps and form != "stock" else "-")
                print(f"  {form:<12} {1e3 * median:>10.1f} {median / stock:>8.2f} {1e3 * warm_up[form]:>11.0f}  "
                      f"{difference}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
