"""Model overhead: Mask2Anomaly forward vs transformers' Mask2Former forward of the same configuration.

Both models are built in this one process from the same configuration (Mask2Former gets the identical
architecture without the background attentions), put in eval mode, and timed alternately on the same input
(batch 1), after warm-up; medians and their ratio are printed, with parameter counts.

    python benchmarks/bench_model.py                      # paper (R-50, 512x1024) and tiny configurations
    python benchmarks/bench_model.py --configs tiny --repeats 20
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation


def mask2former_twin(config: Mask2AnomalyConfig) -> Mask2FormerConfig:
    """The same architecture as a plain transformers Mask2Former configuration."""
    fields = {k: v for k, v in config.to_dict().items() if k in Mask2FormerConfig.__dataclass_fields__}
    fields.pop("model_type", None)
    fields["backbone_config"] = config.backbone_config
    return Mask2FormerConfig(**fields)


def time_forward(model: torch.nn.Module, pixel_values: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(pixel_values)
    return time.perf_counter() - start


def run(name: str, height: int, width: int, repeats: int) -> dict[str, float]:
    config = getattr(Mask2AnomalyConfig, name)()
    torch.manual_seed(0)
    ours = Mask2AnomalyForUniversalSegmentation(config).eval()
    stock = Mask2FormerForUniversalSegmentation(mask2former_twin(config)).eval()
    pixel_values = torch.randn(1, 3, height, width)
    for model in (ours, stock):  # warm-up
        time_forward(model, pixel_values)
    times: dict[str, list[float]] = {"mask2anomaly": [], "mask2former": []}
    for i in range(repeats):
        order = [("mask2anomaly", ours), ("mask2former", stock)]
        for key, model in order if i % 2 == 0 else order[::-1]:
            times[key].append(time_forward(model, pixel_values))
    result = {
        "params_mask2anomaly": sum(p.numel() for p in ours.parameters()),
        "params_mask2former": sum(p.numel() for p in stock.parameters()),
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
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"input 1x3x{args.height}x{args.width}, eval mode, {args.repeats} alternating repeats, medians")
    print("| config | params Mask2Former | params Mask2Anomaly | Mask2Former s | Mask2Anomaly s | ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        r = run(name, args.height, args.width, args.repeats)
        print(
            f"| {name} | {r['params_mask2former']:,} | {r['params_mask2anomaly']:,} | "
            f"{r['median_s_mask2former']:.3f} | {r['median_s_mask2anomaly']:.3f} | {r['ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()
