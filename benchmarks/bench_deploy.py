"""Deployment forms of one model, side by side: transformers' stock Mask2Former form, ours eager (before and
after the faster deformable attention), ours compiled, ONNX Runtime and OpenVINO.

Paper configuration (`Mask2AnomalyConfig.paper()`, R-50, random weights), batch 1, float32, on the CPU. In one
process and one run: every form is built (the ONNX file exported from our model at the size measured), warmed
up, then timed in alternation (form A, B, C, ... then again), `--repeats` times; medians, the ratio of each to
the stock form and the spread are printed. The pixel decoder's time is taken with forward hooks in the same
timed forwards (the stock form, ours before, ours after), and `--profile` prints torch's operator profile of one
forward of the stock form and of ours. The thread count is set deliberately (`--threads`, default 2: this
machine's cores) for torch, ONNX Runtime and OpenVINO alike, and the load average is printed before and after,
since other work on the machine slows every form (the alternation spreads it evenly, the ratios are what count).

Forms:
- `stock`: transformers' `Mask2FormerForUniversalSegmentation` of the same configuration (Mask2Former's
  architecture without the global masked attention's background attentions; the official pipeline's equivalent).
- `ours_before`: our model with the deformable attention in transformers' form (`backend="transformers"`).
- `ours_eager`: our model as it ships (the `embedding_bag` deformable attention).
- `ours_compiled`: `torch.compile(ours_eager)` (inductor, CPU).
- `onnxruntime` / `openvino`: `mask2anomaly-export`'s ONNX file of our model, in each runtime.

    python benchmarks/bench_deploy.py                                  # 512x1024 and 1024x2048, 3 repeats
    python benchmarks/bench_deploy.py --sizes 512x1024 --repeats 5 --profile
    python benchmarks/bench_deploy.py --forms stock ours_eager onnxruntime
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

FORMS = ("stock", "ours_before", "ours_eager", "ours_compiled", "onnxruntime", "openvino")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class DecoderTimer:
    """Wall time spent inside a module (the pixel decoder) during the timed forwards."""

    def __init__(self, module) -> None:
        self.total = 0.0
        self._start = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module, args) -> None:
        self._start = time.perf_counter()

    def _post(self, module, args, output) -> None:
        self.total += time.perf_counter() - self._start


def build_forms(forms: list[str], height: int, width: int, threads: int, workdir: Path):
    """`{form: (run, decoder_timer or None)}`; `run()` does one forward of a fixed random input."""
    import torch
    from transformers import Mask2FormerForUniversalSegmentation

    from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation
    from modeling_mask2anomaly.deformable_attention import set_deformable_attention_backend
    from modeling_mask2anomaly.export import export_onnx, load_runtime
    from modeling_mask2anomaly.modeling_mask2anomaly import mask2former_config_from_mask2anomaly

    torch.manual_seed(0)
    config = Mask2AnomalyConfig.paper()
    pixel_values = torch.randn(1, 3, height, width)
    built: dict[str, tuple[Callable[[], object], DecoderTimer | None]] = {}

    def torch_form(model, timed: bool):
        model = model.eval()
        timer = DecoderTimer(model.model.pixel_level_module.decoder) if timed else None

        def run():
            with torch.inference_mode():
                return model(pixel_values=pixel_values)

        return run, timer

    ours = Mask2AnomalyForUniversalSegmentation(config).eval()
    if "stock" in forms:
        stock = Mask2FormerForUniversalSegmentation(mask2former_config_from_mask2anomaly(config))
        built["stock"] = torch_form(stock, True)
    if "ours_before" in forms:
        before = Mask2AnomalyForUniversalSegmentation(config)
        before.load_state_dict(ours.state_dict())
        set_deformable_attention_backend(before, "transformers")
        built["ours_before"] = torch_form(before, True)
    if "ours_eager" in forms:
        built["ours_eager"] = torch_form(ours, True)
    if "ours_compiled" in forms:
        # a copy without the timing hooks, which would break the compiled graph
        compiled_model = Mask2AnomalyForUniversalSegmentation(config).eval()
        compiled_model.load_state_dict(ours.state_dict())
        compiled = torch.compile(compiled_model)

        def run_compiled():
            with torch.inference_mode():
                return compiled(pixel_values=pixel_values)

        start = time.perf_counter()
        run_compiled()
        print(f"  torch.compile + first forward: {time.perf_counter() - start:.1f} s")
        built["ours_compiled"] = (run_compiled, None)
    runtimes = [f for f in ("onnxruntime", "openvino") if f in forms]
    if runtimes:
        start = time.perf_counter()
        onnx_path = export_onnx(ours, workdir / f"paper_{height}x{width}.onnx", height, width)
        print(f"  ONNX export at {height}x{width}: {time.perf_counter() - start:.1f} s")
        array = pixel_values.numpy()
        with torch.inference_mode():
            eager = ours(pixel_values=pixel_values)
        for runtime in runtimes:
            session = load_runtime(onnx_path, runtime, num_threads=threads)
            class_logits, mask_logits = session(array)
            difference = max(
                float(abs(class_logits - eager.class_queries_logits.numpy()).max()),
                float(abs(mask_logits - eager.masks_queries_logits.numpy()).max()),
            )
            print(f"  {runtime}: max abs logit difference to ours eager {difference:.2e}")
            built[runtime] = ((lambda session=session: session(array)), None)
    return built


def measure(forms: list[str], height: int, width: int, repeats: int, threads: int, profile: bool) -> None:
    import torch

    print(f"\n== paper configuration, {height}x{width}, batch 1, float32, {threads} threads "
          f"(load average before: {load_average()})")
    with tempfile.TemporaryDirectory() as tmp:
        built = build_forms(forms, height, width, threads, Path(tmp))
        for run, _ in built.values():  # warm-up
            run()
        for _, timer in built.values():
            if timer is not None:
                timer.total = 0.0
        times: dict[str, list[float]] = {name: [] for name in built}
        decoder: dict[str, list[float]] = {name: [] for name in built}
        for _ in range(repeats):
            for name, (run, timer) in built.items():
                before = timer.total if timer else 0.0
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
                if timer:
                    decoder[name].append(timer.total - before)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            for name in ("stock", "ours_eager"):
                if name in built:
                    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                        built[name][0]()
                    print(f"\n-- operator profile, {name}, {height}x{width}")
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    reference = statistics.median(times["stock"]) if "stock" in times else None
    print(f"{'form':15s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'x stock':>8s} "
          f"{'pixel decoder s':>16s} {'decoder share':>14s} {'decoder x stock':>16s}")
    stock_decoder = statistics.median(decoder["stock"]) if decoder.get("stock") else None
    for name, values in times.items():
        median = statistics.median(values)
        ratio = f"{median / reference:8.3f}" if reference else f"{'-':>8s}"
        if decoder[name]:
            d = statistics.median(decoder[name])
            share = f"{100 * d / median:13.1f}%"
            d_ratio = f"{d / stock_decoder:16.3f}" if stock_decoder else f"{'-':>16s}"
            d_text = f"{d:16.3f}"
        else:
            d_text, share, d_ratio = f"{'-':>16s}", f"{'-':>14s}", f"{'-':>16s}"
        print(f"{name:15s} {median:9.3f} {min(values):7.3f} {max(values):7.3f} {ratio} {d_text} {share} {d_ratio}")
    print(f"load average after: {load_average()}  (1, 5, 15 min; {os.cpu_count()} CPUs)")
    del torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["512x1024", "1024x2048"], help="HEIGHTxWIDTH, each")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per form (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="threads of torch and the runtimes (default: 2)")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    parser.add_argument("--profile", action="store_true", help="print an operator profile of stock and ours eager")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; forms: {', '.join(args.forms)}")
    for size in args.sizes:
        height, width = (int(v) for v in size.lower().split("x"))
        measure(args.forms, height, width, args.repeats, args.threads, args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
