"""Model overhead: Mask2Anomaly forward vs transformers' Mask2Former forward of the same configuration.

Both models are built in this one process from the same configuration (Mask2Former gets the identical
architecture without the background attentions), put in eval mode, and timed alternately on the same input
(batch 1), after warm-up; medians and their ratio are printed, with parameter counts, images per second, and
how much of the machine's matrix throughput each forward reaches: the forward's matrix FLOPs (convolutions,
matmuls, attention, counted by `torch.utils.flop_counter`; the deformable attention's `grid_sample` is not matrix
work and is not counted) per second, divided by the FLOP/s of a large square matmul measured in the same run,
in the same precision (fp32, or bf16 under `--autocast bf16`). On a known GPU the nominal dense peak is printed too.

    python benchmarks/bench_model.py                      # paper (R-50, 512x1024) and tiny configurations
    python benchmarks/bench_model.py --configs tiny --repeats 20
    python benchmarks/bench_model.py --device cuda --height 1024 --width 2048     # GPU, Cityscapes size
    python benchmarks/bench_model.py --device cuda --autocast bf16 --compile   # GPU variants
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Mask2FormerForUniversalSegmentation

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation
from modeling_mask2anomaly.inference import resolve_device
from modeling_mask2anomaly.modeling_mask2anomaly import mask2former_config_from_mask2anomaly

# Nominal dense matrix peaks (TFLOP/s, without sparsity) of GPUs the project is benchmarked on, by name fragment.
NOMINAL_TFLOPS = {
    "H100": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},  # SXM
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Median FLOP/s of a square matmul big enough to saturate the device (the measured matrix peak)."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


@contextlib.contextmanager
def inference(device: torch.device, autocast: str | None):
    """Inference mode, with bf16 autocast when `autocast == "bf16"`: the setting of every forward here."""
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        yield


def forward_flops(model, pixel_values: torch.Tensor, autocast: str | None) -> int:
    """Matrix FLOPs of one forward (uncompiled model), as counted by torch's FLOP counter."""
    counter = FlopCounterMode(display=False)
    with inference(pixel_values.device, autocast), counter:
        model(pixel_values)
    return counter.get_total_flops()


def nominal_peak(device: torch.device, autocast: str | None) -> float | None:
    """The device's nominal dense TFLOP/s in the precision used (fp32 counts TF32 when torch allows it)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in NOMINAL_TFLOPS.items():
        if fragment in name:
            if autocast == "bf16":
                return peaks["bf16"]
            return peaks["tf32"] if torch.backends.cuda.matmul.allow_tf32 else peaks["fp32"]
    return None


def outputs_of(model, pixel_values: torch.Tensor, autocast: str | None) -> dict[str, torch.Tensor]:
    with inference(pixel_values.device, autocast):
        outputs = model(pixel_values)
    return {"class logits": outputs.class_queries_logits.float(), "mask logits": outputs.masks_queries_logits.float()}


def time_forward(model, pixel_values: torch.Tensor, autocast: str | None) -> float:
    device = pixel_values.device
    synchronize(device)
    start = time.perf_counter()
    with inference(device, autocast):
        model(pixel_values)
    synchronize(device)
    return time.perf_counter() - start


def run(name: str, height: int, width: int, repeats: int, device: str = "cpu", autocast: str | None = None,
        compile_model: bool = False) -> dict[str, float]:
    config = getattr(Mask2AnomalyConfig, name)()
    torch.manual_seed(0)
    ours = Mask2AnomalyForUniversalSegmentation(config).eval().to(device)
    stock = Mask2FormerForUniversalSegmentation(mask2former_config_from_mask2anomaly(config)).eval().to(device)
    params = (sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in stock.parameters()))
    pixel_values = torch.randn(1, 3, height, width, device=device)
    flops = {"mask2anomaly": forward_flops(ours, pixel_values, autocast),
             "mask2former": forward_flops(stock, pixel_values, autocast)}
    reference = outputs_of(ours, pixel_values, None)  # eager float32: what the variants are checked against
    if compile_model:
        ours, stock = torch.compile(ours), torch.compile(stock)
    for model in (ours, stock):  # warm-up (and compilation)
        time_forward(model, pixel_values, autocast)
    times: dict[str, list[float]] = {"mask2anomaly": [], "mask2former": []}
    for i in range(repeats):
        order = [("mask2anomaly", ours), ("mask2former", stock)]
        for key, model in order if i % 2 == 0 else order[::-1]:
            times[key].append(time_forward(model, pixel_values, autocast))
    variant = outputs_of(ours, pixel_values, autocast)
    result = {
        "max_abs_difference": {key: (variant[key] - reference[key]).abs().max().item() for key in reference},
        "params_mask2anomaly": params[0],
        "params_mask2former": params[1],
        "median_s_mask2anomaly": statistics.median(times["mask2anomaly"]),
        "median_s_mask2former": statistics.median(times["mask2former"]),
    }
    result["ratio"] = result["median_s_mask2anomaly"] / result["median_s_mask2former"]
    for key in times:
        result[f"gflops_{key}"] = flops[key] / 1e9
        result[f"images_per_s_{key}"] = 1.0 / result[f"median_s_{key}"]
        result[f"achieved_tflops_{key}"] = flops[key] / result[f"median_s_{key}"] / 1e12
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["paper", "tiny"], choices=["paper", "tiny"])
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["bf16"], default=None, help="bf16 autocast around the forward")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.autocast == "bf16" and device.type == "cpu":
        print("note: bf16 autocast on the CPU only checks that the code path runs: torch's CPU grid_sample gives "
              "wrong bfloat16 values for the pixel decoder's strided inputs, and CPU bf16 speed is not a GPU's")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"input 1x3x{args.height}x{args.width} on {args.device}, autocast {args.autocast}, compile {args.compile}, "
          f"eval mode, {args.repeats} alternating repeats, medians")
    if device.type == "cuda":
        print(f"device {torch.cuda.get_device_name(device)}, TF32 matmul allowed: {torch.backends.cuda.matmul.allow_tf32}")
    dtype = torch.bfloat16 if args.autocast == "bf16" else torch.float32
    peak = matmul_flops_per_second(device, dtype) / 1e12
    nominal = nominal_peak(device, args.autocast)
    print(f"measured matmul peak ({dtype}): {peak:.3f} TFLOP/s" + (f"; nominal dense peak {nominal} TFLOP/s"
                                                                 if nominal else ""))
    print("| config | params Mask2Former | params Mask2Anomaly | Mask2Former s | Mask2Anomaly s | ratio "
          "| GFLOP Mask2Former / Mask2Anomaly | images/s Mask2Former / Mask2Anomaly "
          "| Mask2Anomaly TFLOP/s (fraction of measured peak" + (", of nominal" if nominal else "") + ") |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        r = run(name, args.height, args.width, args.repeats, str(device), args.autocast, args.compile)
        achieved = r["achieved_tflops_mask2anomaly"]
        fraction = f"{achieved:.3f} ({achieved / peak:.1%}" + (f", {achieved / nominal:.1%}" if nominal else "") + ")"
        print(
            f"| {name} | {r['params_mask2former']:,} | {r['params_mask2anomaly']:,} | "
            f"{r['median_s_mask2former']:.3f} | {r['median_s_mask2anomaly']:.3f} | {r['ratio']:.3f} | "
            f"{r['gflops_mask2former']:.1f} / {r['gflops_mask2anomaly']:.1f} | "
            f"{r['images_per_s_mask2former']:.2f} / {r['images_per_s_mask2anomaly']:.2f} | {fraction} |"
        )
        if args.autocast or args.compile:
            differences = ", ".join(f"{key} {value:.2g}" for key, value in r["max_abs_difference"].items())
            print(f"|  | Mask2Anomaly outputs vs eager float32, max abs difference: {differences} |")


if __name__ == "__main__":
    main()
