"""Model overhead: Mask2Anomaly forward vs transformers' Mask2Former forward of the same configuration.

Both models are built in this one process from the same configuration (Mask2Former gets the identical
architecture without the background attentions), put in eval mode, and timed alternately on the same input
(batch 1), after warm-up; medians and their ratio are printed, with parameter counts.

    python benchmarks/bench_model.py                      # paper (R-50, 512x1024) and tiny configurations
    python benchmarks/bench_model.py --configs tiny --repeats 20
    python benchmarks/bench_model.py --device cuda --autocast bf16 --compile   # GPU variants
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import Mask2FormerForUniversalSegmentation

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation
from modeling_mask2anomaly.convert import mask2former_config_from_mask2anomaly


def time_forward(model, pixel_values: torch.Tensor, autocast: str | None) -> float:
    device = pixel_values.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        model(pixel_values)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(name: str, height: int, width: int, repeats: int, device: str = "cpu", autocast: str | None = None,
        compile_model: bool = False) -> dict[str, float]:
    config = getattr(Mask2AnomalyConfig, name)()
    torch.manual_seed(0)
    ours = Mask2AnomalyForUniversalSegmentation(config).eval().to(device)
    stock = Mask2FormerForUniversalSegmentation(mask2former_config_from_mask2anomaly(config)).eval().to(device)
    params = (sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in stock.parameters()))
    if compile_model:
        ours, stock = torch.compile(ours), torch.compile(stock)
    pixel_values = torch.randn(1, 3, height, width, device=device)
    for model in (ours, stock):  # warm-up (and compilation)
        time_forward(model, pixel_values, autocast)
    times: dict[str, list[float]] = {"mask2anomaly": [], "mask2former": []}
    for i in range(repeats):
        order = [("mask2anomaly", ours), ("mask2former", stock)]
        for key, model in order if i % 2 == 0 else order[::-1]:
            times[key].append(time_forward(model, pixel_values, autocast))
    result = {
        "params_mask2anomaly": params[0],
        "params_mask2former": params[1],
        "median_s_mask2anomaly": statistics.median(times["mask2anomaly"]),
        "median_s_mask2former": statistics.median(times["mask2former"]),
    }
    result["ratio"] = result["median_s_mask2anomaly"] / result["median_s_mask2former"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["paper", "tiny"], choices=["paper", "tiny"])
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["bf16"], default=None, help="bf16 autocast around the forward")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"input 1x3x{args.height}x{args.width} on {args.device}, autocast {args.autocast}, compile {args.compile}, "
          f"eval mode, {args.repeats} alternating repeats, medians")
    print("| config | params Mask2Former | params Mask2Anomaly | Mask2Former s | Mask2Anomaly s | ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        r = run(name, args.height, args.width, args.repeats, args.device, args.autocast, args.compile)
        print(
            f"| {name} | {r['params_mask2former']:,} | {r['params_mask2anomaly']:,} | "
            f"{r['median_s_mask2former']:.3f} | {r['median_s_mask2anomaly']:.3f} | {r['ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()
