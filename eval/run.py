"""`mask2anomaly-eval`: run a Mask2Anomaly model over an anomaly-segmentation benchmark and write its metrics.

    mask2anomaly-eval --model DIR_OR_HUB_ID --benchmark smiyc_ra21 --data-dir data/RoadAnomaly21 --output-dir results/
    accelerate launch --multi_gpu --num_processes 2 -m mask2anomaly_eval.run --model ... --benchmark ... --data-dir ...

(``--multi_gpu`` also on a machine without accelerator, where it gives a CPU process group; accelerate's ``--cpu``
starts a single process.)

The benchmark is read by its entry of the reader registry (`mask2anomaly_eval.datasets.BENCHMARKS`) and evaluated
by the one evaluation loop (`mask2anomaly_eval.loop.evaluate`): every process takes a strided shard of the images
(``items[rank::world]``), predicts anomaly maps `--batch-size` at a time at the original image size and adds them
to a streaming pixel-metric accumulator; the accumulators are gathered and merged, so memory does not grow with
the number of pixels and the numbers do not depend on the number of processes (exactly so in ``exact`` mode).

Component metrics (``--components``: sIoU, PPV, mean F1 as SegmentMeIfYouCan defines them) are scored at the best-F1
threshold of the pooled pixel curve (or at ``--anomaly-threshold``); the track (component size thresholds) is the
benchmark reader's: ``obstacle`` for RoadObstacle21 and SynthRoad's obstacle split, ``anomaly`` otherwise.

Items that cannot be evaluated (unreadable image or label, label values other than 0/1/255, label size different
from the image's) are reported with the reason and skipped; the run goes on and exits with status 1 at the end.
Outputs: ``<output-dir>/<benchmark>[-<split>].json`` (metrics as fractions, model, benchmark, split, track, options,
image counts and whether ``--limit`` cut them, failures, timing) and the same name with ``.md`` (a markdown table),
each written atomically; the split is the folder's for benchmarks with several (``synthroad-obstacle.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.logging import get_logger

from modeling_mask2anomaly.atomic_io import write_text_atomically
from modeling_mask2anomaly.image_processing_mask2anomaly import Mask2AnomalyImageProcessor
from modeling_mask2anomaly.inference import ModelNotFoundError, load_model_and_processor

from .cli import build_parser, main  # noqa: F401  (main: `python -m mask2anomaly_eval.run`)
from .datasets import BENCHMARKS, AnomalyBenchmark, get_benchmark
from .loop import COMPONENT_METRICS, PIXEL_METRICS, evaluate

logger = get_logger(__name__)


# ------------------------------------------------------------------------------------------------ outputs


def results_markdown(record: Mapping[str, Any]) -> str:
    """A markdown table of one evaluation record (metrics in %)."""
    options = record["options"]
    names = [name for key, name in PIXEL_METRICS + COMPONENT_METRICS if key in record["metrics"]]
    values = []
    for key, _ in PIXEL_METRICS + COMPONENT_METRICS:
        if key in record["metrics"]:
            value = record["metrics"][key]
            values.append("–" if value is None else f"{100 * value:.2f}")
    lines = [
        f"### {record['benchmark_name']}" + (f" ({record['split']} split)" if record.get("split") else "")
        + f" — `{record['model']}`",
        "",
        (f"Limited by --limit {record['limit']} to the first {record['num_items']} of {record['num_available']} "
         "images. " if record.get("limited") else "")
        + f"{record['num_images']} of {record['num_items']} images, mode `{options['mode']}`, flip TTA "
        f"{'on' if options['flip_tta'] else 'off'}, refinement {'on' if options['refine'] else 'off'}, scorer "
        f"`{options['scorer']}`" + (f", {options['track']} track" if options["components"] else "") + "; values in %.",
        "",
        "| " + " | ".join(names) + " |",
        "|" + "---|" * len(names),
        "| " + " | ".join(values) + " |",
    ]
    if record["failures"]:
        lines += ["", f"{len(record['failures'])} item(s) failed and were skipped:", ""]
        lines += [f"- {failure['error']}" for failure in record["failures"]]
    return "\n".join(lines) + "\n"


def result_record(args: argparse.Namespace, benchmark: AnomalyBenchmark, result: Mapping[str, Any]) -> dict[str, Any]:
    """What a results file holds: the model, the benchmark and its split, the track, how many of the benchmark's
    images were evaluated and whether ``--limit`` cut them short, then `evaluate`'s result (metrics, options,
    counts, failures, timing)."""
    return {"model": args.model, "benchmark": args.benchmark, "benchmark_name": BENCHMARKS[args.benchmark].title,
            "split": benchmark.split, "track": benchmark.track, "data_dir": os.path.abspath(args.data_dir),
            "mode": args.mode, "num_available": len(benchmark), "limit": args.limit,
            "limited": args.limit is not None and args.limit < len(benchmark), **result}


def results_stem(record: Mapping[str, Any]) -> str:
    """The results files' name: the benchmark, and its split where it has one (``synthroad-obstacle``), so that
    the splits of one benchmark do not overwrite each other."""
    return record["benchmark"] + (f"-{record['split']}" if record.get("split") else "")


def write_results(record: Mapping[str, Any], output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<benchmark>[-<split>].json`` and ``.md`` into ``output_dir`` (atomically); return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / f"{results_stem(record)}.json"
    markdown_path = output_dir / f"{results_stem(record)}.md"
    write_text_atomically(json_path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    write_text_atomically(markdown_path, results_markdown(record))
    return json_path, markdown_path


# ------------------------------------------------------------------------------------------------ command line


def _has_accelerator() -> bool:
    # accelerate only sets up a multi-process CPU group (gloo) when told cpu=True; without it, processes started by
    # `accelerate launch --multi_gpu` / torchrun on a machine with no accelerator would each run alone.
    accelerator_api = getattr(torch, "accelerator", None)
    if accelerator_api is not None:
        return accelerator_api.current_accelerator() is not None
    return torch.cuda.is_available()


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The command once its arguments are parsed (`cli.build_parser`) and its threads set."""
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: expected at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit {args.limit}: expected at least 1")
    if args.anomaly_threshold is not None and not args.components:
        parser.error("--anomaly-threshold is the component-metric threshold; it needs --components")
    state = PartialState(cpu=args.cpu or not _has_accelerator())
    try:
        benchmark = get_benchmark(args.benchmark, args.data_dir, track=args.track)
    except (ValueError, FileNotFoundError) as err:
        print(f"mask2anomaly-eval: cannot open benchmark {args.benchmark!r} in {args.data_dir!r}: {err}",
              file=sys.stderr)
        return 2
    try:
        model, processor = load_model_and_processor(args.model, state.device)
    except ModelNotFoundError as err:
        print(f"mask2anomaly-eval: --model: {err}", file=sys.stderr)
        return 2
    try:
        result = evaluate(
            model, processor, benchmark, mode=args.mode, components=args.components, track=benchmark.track,
            flip_tta=False if args.no_flip else None, refine=False if args.no_refine else None,
            scorer=args.anomaly_scorer, anomaly_threshold=args.anomaly_threshold, batch_size=args.batch_size,
            limit=args.limit, accelerator=state, skip_without_anomaly=benchmark.skip_without_anomaly,
        )
    except ValueError as err:
        print(f"mask2anomaly-eval: {err}", file=sys.stderr)
        return 1
    record = result_record(args, benchmark, result)
    if state.is_main_process:
        json_path, markdown_path = write_results(record, args.output_dir)
        summary = ", ".join(f"{name} {100 * record['metrics'][key]:.2f}" for key, name in
                            PIXEL_METRICS + COMPONENT_METRICS if record["metrics"].get(key) is not None)
        print(f"{results_stem(record)}: {record['num_images']}/{record['num_items']} images, {summary} (%) "
              f"in {record['timing']['total_seconds']:.1f}s -> {json_path}, {markdown_path}")
        for failure in record["failures"]:
            print(f"failed: {failure['error']}", file=sys.stderr)
    state.wait_for_everyone()
    return 1 if record["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
