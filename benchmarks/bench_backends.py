"""Deployment forms of one model side by side: transformers' stock Mask2Former form, ours before and after the faster
deformable attention, ours compiled, ONNX Runtime and OpenVINO, each as a ratio to the stock form, in one run on
the same image.

Setting: the paper configuration (`Mask2AnomalyConfig.paper()`: ResNet-50, 6-layer deformable pixel decoder, 9
decoder layers, 100 queries; random weights, which cost the same as trained ones), batch 1, float32. Forms, all
run through the one backend interface (`modeling_mask2anomaly.backends`):

- `stock`: transformers' `Mask2FormerForUniversalSegmentation` of the same architecture
  (`mask2former_config_from_mask2anomaly`, i.e. without the background attentions; the official pipeline's
  equivalent, the reference of every ratio);
- `before`: our model with the deformable attention in transformers' form (`backend="transformers"`);
- `eager`: our model as it ships (the `embedding_bag` deformable attention);
- `compiled`: `torch.compile` of it (inductor; the compilation is the warm-up, printed apart);
- `onnxruntime` / `openvino`: `model.onnx` written by `modeling_mask2anomaly.export.export_folder` at each size
  (fixed size, batch 1; the export is set-up, not part of the figures).

Modes (`--modes`, both by default): `forward` is `backend(pixel_values)`; `end-to-end` is `predict_anomaly` from the
(H, W, 3) uint8 image to the anomaly and semantic maps (pre-processing, forward, post-processing, no flip), what
`mask2anomaly-predict --backend` costs per image. The forms are timed alternately (one call of each per round,
`--repeats` rounds after a warm-up round); medians, min-max, ratio to the stock form, and for the eager torch forms
the pixel decoder's time inside those same calls (forward hooks) with its share and its ratio to the stock
decoder's. The forward table also gives the fraction of the measured matmul peak each form reaches: its forward's
matrix FLOPs (`torch.utils.flop_counter`, counted once per model; the ONNX forms run our model's) per second over
the FLOP/s of a large square matmul measured in the same run (`bench_model.matmul_flops_per_second`). `--profile`
prints torch's operator profile of one forward of the stock form and of ours eager. Every form gets `--threads`
threads (torch, ONNX Runtime's intra-op pool, OpenVINO's inference threads); the load average is printed before
and after, since other work on the machine slows every form (the alternation spreads it evenly).

    python benchmarks/bench_backends.py --threads 2                      # 512x1024 and 1024x2048, all forms
    python benchmarks/bench_backends.py --sizes 512x1024 --repeats 3 --forms stock before eager openvino --profile
    python benchmarks/bench_backends.py --config tiny --sizes 128x256 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_model import forward_flops, matmul_flops_per_second
from transformers import Mask2FormerForUniversalSegmentation

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation, Mask2AnomalyImageProcessor
from modeling_mask2anomaly.backends import Backend, TorchBackend, load_backend
from modeling_mask2anomaly.deformable_attention import set_deformable_attention_backend
from modeling_mask2anomaly.export import export_folder
from modeling_mask2anomaly.inference import predict_anomaly
from modeling_mask2anomaly.modeling_mask2anomaly import mask2former_config_from_mask2anomaly

FORMS = ("stock", "before", "eager", "compiled", "onnxruntime", "openvino")
MODES = ("forward", "end-to-end")


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 512x1024") from err
    if height % 32 or width % 32 or height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"size {text!r}: height and width must be positive multiples of 32")
    return height, width


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def road_like_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random (H, W, 3) uint8 image (what a photo compresses like; the cost does not depend on it)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
    rows = np.linspace(0, coarse.shape[0] - 1, height)
    cols = np.linspace(0, coarse.shape[1] - 1, width)
    image = coarse[rows.astype(int)][:, cols.astype(int)]
    return np.clip(image + rng.normal(0, 8, size=image.shape), 0, 255).astype(np.uint8)


class DecoderTimer:
    """Wall time spent inside a module (the pixel decoder) during the timed calls, through forward hooks."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module, args) -> None:
        self._start = time.perf_counter()

    def _post(self, module, args, output) -> None:
        self.total += time.perf_counter() - self._start


class Form:
    """One form: its backend, the eager torch model behind it (None for compiled and ONNX forms: no hooks there),
    the model whose FLOPs it computes, and the pixel decoder timer of eager torch forms."""

    def __init__(self, backend: Backend, model: torch.nn.Module | None, flops_model: torch.nn.Module) -> None:
        self.backend = backend
        self.flops_model = flops_model
        self.decoder = DecoderTimer(model.model.pixel_level_module.decoder) if model is not None else None


def build_forms(config: Mask2AnomalyConfig, forms: list[str], height: int, width: int, folder: Path,
                threads: int) -> tuple[dict[str, Form], Mask2AnomalyImageProcessor]:
    """The forms for one input size; the processor keeps an image of that size as it is."""
    torch.manual_seed(0)
    model = Mask2AnomalyForUniversalSegmentation(config).eval()
    processor = Mask2AnomalyImageProcessor.from_model_config(config, size={"shortest_edge": height,
                                                                           "longest_edge": width})

    def copy_of_ours() -> Mask2AnomalyForUniversalSegmentation:
        other = Mask2AnomalyForUniversalSegmentation(config).eval()
        other.load_state_dict(model.state_dict())
        return other

    built: dict[str, Form] = {}
    if "stock" in forms:
        stock = Mask2FormerForUniversalSegmentation(mask2former_config_from_mask2anomaly(config)).eval()
        built["stock"] = Form(TorchBackend(stock), stock, stock)
    if "before" in forms:
        before = copy_of_ours()
        set_deformable_attention_backend(before, "transformers")
        built["before"] = Form(TorchBackend(before), before, model)
    built["eager"] = Form(TorchBackend(model), model, model)  # always: the reference of the map differences
    if "compiled" in forms:  # a copy without the timing hooks, which would break the compiled graph
        built["compiled"] = Form(TorchBackend(copy_of_ours(), compile=True), None, model)
    runtimes = [form for form in forms if form in ("onnxruntime", "openvino")]
    if runtimes:
        source, exported = folder / f"model-{height}x{width}", folder / f"onnx-{height}x{width}"
        model.save_pretrained(source)
        processor.save_pretrained(source)
        start = time.perf_counter()
        export_folder(source, exported, height, width, verify=())
        print(f"  exported {height}x{width} in {time.perf_counter() - start:.0f} s", flush=True)
        for form in runtimes:
            backend, _ = load_backend(exported, form, num_threads=threads)
            built[form] = Form(backend, None, model)
    return {form: built[form] for form in [*forms, "eager"] if form in built}, processor


def measure(forms: dict[str, Form], processor: Mask2AnomalyImageProcessor, image: np.ndarray, mode: str,
            repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float],
                                   dict[str, np.ndarray]]:
    """Alternating timings (seconds) per form, the pixel decoder's share of each timed call (eager torch forms), the
    warm-up time per form, and the anomaly maps (end to end)."""
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    maps: dict[str, np.ndarray] = {}

    def call(name: str) -> Callable[[], None]:
        backend = forms[name].backend
        if mode == "end-to-end":
            def run() -> None:
                maps[name] = predict_anomaly(backend, processor, image, flip_tta=False)[0].anomaly_map
        else:
            def run() -> None:
                backend(pixel_values)
        return run

    runs = {name: call(name) for name in forms}
    warm_up = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        warm_up[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in runs}
    decoder: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            timer = forms[name].decoder
            before = timer.total if timer else 0.0
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            if timer:
                decoder[name].append(timer.total - before)
    return times, decoder, warm_up, maps


def print_table(mode: str, times: dict[str, list[float]], decoder: dict[str, list[float]], warm_up: dict[str, float],
                maps: dict[str, np.ndarray], flops: dict[str, float], peak: float) -> None:
    stock = statistics.median(times["stock"])
    stock_decoder = statistics.median(decoder["stock"]) if decoder.get("stock") else None
    print(f"  {mode}:")
    print(f"  {'form':<12} {'median ms':>10} {'min-max ms':>17} {'x stock':>8} {'decoder ms':>11} {'share':>6} "
          f"{'dec x stock':>11} {'% peak':>7} {'warm-up ms':>11}  max |map - eager|")
    for name, values in times.items():
        median = statistics.median(values)
        spread = f"{1e3 * min(values):.0f}-{1e3 * max(values):.0f}"
        if decoder[name]:
            d = statistics.median(decoder[name])
            dec = f"{1e3 * d:>11.1f} {100 * d / median:>5.1f}% " + (f"{d / stock_decoder:>11.3f}" if stock_decoder
                                                                     else f"{'-':>11}")
        else:
            dec = f"{'-':>11} {'-':>6} {'-':>11}"
        fraction = f"{100 * flops[name] / median / peak:>6.1f}%" if mode == "forward" else f"{'-':>7}"
        difference = (f"{float(np.abs(maps[name] - maps['eager']).max()):.1e}"
                      if name in maps and name != "stock" else "-")
        print(f"  {name:<12} {1e3 * median:>10.1f} {spread:>17} {median / stock:>8.2f} {dec} {fraction} "
              f"{1e3 * warm_up[name]:>11.0f}  {difference}", flush=True)


def profile_forwards(forms: dict[str, Form], pixel_values: torch.Tensor, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name in ("stock", "eager"):
        if name in forms:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                forms[name].backend(pixel_values)
            print(f"\n-- operator profile of one forward, {name}, {label}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="forward (pixel_values -> logits) and/or end-to-end (image -> maps); default both")
    parser.add_argument("--end-to-end", action="store_true", help="the same as --modes end-to-end")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(512, 1024), (1024, 2048)],
                        metavar="HxW", help="input sizes (default: 512x1024 1024x2048)")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help="what to time (default: all)")
    parser.add_argument("--config", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (default: 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads of every form (default: torch's, %(default)s)")
    parser.add_argument("--profile", action="store_true", help="print an operator profile of stock and ours eager")
    args = parser.parse_args(argv)
    modes = ["end-to-end"] if args.end_to_end else args.modes
    forms = list(dict.fromkeys(["stock", *args.forms]))  # the ratios' reference is always timed
    torch.set_num_threads(args.threads)
    config = getattr(Mask2AnomalyConfig, args.config)()
    peak = matmul_flops_per_second(torch.device("cpu"), torch.float32)
    print(f"{args.config} config; torch {torch.__version__}, {args.threads} threads, {args.repeats} alternating "
          f"rounds; medians; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; load average {load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        for height, width in args.sizes:
            print(f"\n{height}x{width}:", flush=True)
            built, processor = build_forms(config, forms, height, width, Path(tmp), args.threads)
            image = road_like_image(height, width)
            pixel_values = processor(image, return_tensors="pt")["pixel_values"]
            counted: dict[int, float] = {}
            for form in built.values():
                key = id(form.flops_model)
                if key not in counted:
                    counted[key] = float(forward_flops(form.flops_model, pixel_values, None))
            flops = {name: counted[id(form.flops_model)] for name, form in built.items()}
            print(f"  matrix GFLOP per forward: stock {flops['stock'] / 1e9:.2f}, ours {flops['eager'] / 1e9:.2f}")
            for mode in modes:
                times, decoder, warm_up, maps = measure(built, processor, image, mode, args.repeats)
                print_table(mode, times, decoder, warm_up, maps, flops, peak)
            if args.profile:
                profile_forwards(built, pixel_values, f"{height}x{width}")
    print(f"\nload average after: {load_average()}  (1, 5, 15 min; {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
