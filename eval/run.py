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
from the image's, a label above PIL's pixel limit; a label's failure is reported under the label's path) are
reported with the reason and skipped; the run goes on and exits with status 1 at the end. Images without a label
file are left out and listed (``unlabelled`` in the JSON). The output folder is checked for writing before the
evaluation starts; if writing the results fails anyway (a disk that filled up meanwhile), they are printed as JSON.

Outputs in ``--output-dir``, each written atomically, with ``<stem>`` = ``<benchmark>[-<split>]`` (the split is the
folder's for benchmarks with several, e.g. ``synthroad-obstacle``), and ``-<scorer>`` appended per scorer with
``--anomaly-scorer all``, which scores every registered scorer from one pass over the frames:

- ``<stem>.json``: metrics as fractions, model, benchmark, split, track, options, image counts and whether
  ``--limit`` cut them, failures, timing, the per-image
  rows and, with ``--bootstrap N``, 95 % percentile intervals from ``N`` seeded resamples of the images;
- ``<stem>.md``: a markdown report (metrics table, intervals, the pictures and tables below);
- ``<stem>_per_image.csv``: per image its score statistics, anomalous area and per-image AuPRC/FPR95/AUROC;
- ``<stem>_pr.png``, ``<stem>_roc.png`` and ``<stem>_curve.csv``: the pooled PR and ROC curves (unless
  ``--no-curves``; the PNGs need matplotlib, from the ``[eval]`` extra);
- ``<stem>_heatmaps/{worst,best}-<rank>-<image>.png`` with ``--visualize K``: the K images with the lowest and the
  highest per-image AuPRC.

``mask2anomaly-eval --compare results/*.json`` instead reads result records and writes one table of models x
benchmarks x scorers (``comparison.md`` and ``comparison.csv`` in ``--output-dir``), also printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.logging import get_logger

from modeling_mask2anomaly.atomic_io import check_writable_folder, write_text_atomically
from modeling_mask2anomaly.inference import ModelNotFoundError, load_model_and_processor
from modeling_mask2anomaly.scorers import ANOMALY_SCORERS

from .cli import build_parser, main  # noqa: F401  (main: `python -m mask2anomaly_eval.run`)
from .datasets import BENCHMARKS, AnomalyBenchmark, get_benchmark
from .loop import COMPONENT_METRICS, PIXEL_METRICS, evaluate_scorers

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
    counts, failures, timing, per-image rows; not the curve points and heatmap sources, which go to their files)."""
    return {"model": args.model, "benchmark": args.benchmark, "benchmark_name": BENCHMARKS[args.benchmark].title,
            "split": benchmark.split, "track": benchmark.track, "data_dir": os.path.abspath(args.data_dir),
            "mode": args.mode, "num_available": len(benchmark), "limit": args.limit,
            "limited": args.limit is not None and args.limit < len(benchmark),
            **{key: value for key, value in result.items() if key not in ("curve", "extreme_images")},
            "unlabelled": [os.fspath(path) for path in benchmark.unlabelled]}


def results_stem(record: Mapping[str, Any], scorer: str | None = None) -> str:
    """The results files' name: the benchmark, its split where it has one (``synthroad-obstacle``), so that the
    splits of one benchmark do not overwrite each other, and the scorer with ``--anomaly-scorer all``."""
    return (record["benchmark"] + (f"-{record['split']}" if record.get("split") else "")
            + (f"-{scorer}" if scorer else ""))


def write_results(record: Mapping[str, Any], output_dir: str | os.PathLike, stem: str | None = None,
                  extra_markdown: str = "") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` (default stem: `results_stem`) into ``output_dir`` (atomically);
    return their paths. ``extra_markdown`` is appended to the report (the files section)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or results_stem(record)
    json_path = output_dir / f"{stem}.json"
    markdown_path = output_dir / f"{stem}.md"
    write_text_atomically(json_path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    write_text_atomically(markdown_path, results_markdown(record) + extra_markdown)
    return json_path, markdown_path


def intervals_markdown(record: Mapping[str, Any]) -> str:
    """The bootstrap intervals of a record as a markdown table row block (empty without a bootstrap)."""
    bootstrap = record.get("bootstrap")
    if not bootstrap:
        return ""
    intervals = bootstrap["intervals"]
    keys = [(key, name) for key, name in PIXEL_METRICS + COMPONENT_METRICS if key in intervals]
    cells = []
    for key, _ in keys:
        low, high = intervals[key]["low"], intervals[key]["high"]
        cells.append("–" if low is None else f"[{100 * low:.2f}, {100 * high:.2f}]")
    return "\n".join([
        "", f"{100 * bootstrap['confidence']:.0f} % bootstrap intervals ({bootstrap['num_resamples']} resamples of "
        f"the images, seed {bootstrap['seed']}, percentile method; components at the full set's threshold):", "",
        "| " + " | ".join(name for _, name in keys) + " |", "|" + "---|" * len(keys), "| " + " | ".join(cells) + " |",
    ]) + "\n"


def write_figures(result: Mapping[str, Any], output_dir: Path, stem: str, title: str, scorer: str,
                  threshold: float | None) -> tuple[list[Path], str]:
    """Write the per-image CSV, the curve PNGs and CSV and the heatmaps that ``result`` holds; return their paths
    and the markdown section that lists them."""
    from .per_image import per_image_csv

    lines = ["", "Files:", ""]
    written: list[Path] = []
    if "per_image" in result:
        path = output_dir / f"{stem}_per_image.csv"
        write_text_atomically(path, per_image_csv(result["per_image"]))
        written.append(path)
        lines.append(f"- per-image table: [{path.name}]({path.name})")
    curve = result.get("curve")
    if curve:
        path = output_dir / f"{stem}_curve.csv"
        rows = zip(curve["thresholds"], curve["tpr"], curve["fpr"], curve["precision"])
        write_text_atomically(path, "threshold,tpr,fpr,precision\n" + "".join(
            f"{t:.9g},{a:.9g},{b:.9g},{c:.9g}\n" for t, a, b, c in rows))
        written.append(path)
        lines.append(f"- pooled curve points: [{path.name}]({path.name})")
        try:
            from .figures import plot_curves

            metrics = dict(result["metrics"], fpr95_tpr=result["pixel"].get("fpr95_tpr"))
            pr_path, roc_path = plot_curves(curve, metrics, title, output_dir / f"{stem}_pr.png",
                                            output_dir / f"{stem}_roc.png")
        except ImportError as err:
            logger.warning(f"no curve pictures: {err}", main_process_only=True)
        else:
            written += [pr_path, roc_path]
            lines += ["", f"![PR curve]({pr_path.name}) ![ROC curve]({roc_path.name})", ""]
    extremes = result.get("extreme_images")
    if extremes:
        from .figures import write_heatmaps

        folder = output_dir / f"{stem}_heatmaps"
        for label, entries in zip(("worst", "best"), extremes):
            paths = write_heatmaps(entries, folder, label, scorer, threshold)
            written += paths
            if paths:
                listed = ", ".join(f"[{Path(entry[2]).name}]({folder.name}/{path.name}) (AuPRC {100 * entry[0]:.1f})"
                                   for entry, path in zip(entries, paths))
                lines.append(f"- {label} images by per-image AuPRC: {listed}")
    return written, "\n".join(lines) + "\n" if len(lines) > 3 else ""


# ------------------------------------------------------------------------------------------------ command line


def _has_accelerator() -> bool:
    # accelerate only sets up a multi-process CPU group (gloo) when told cpu=True; without it, processes started by
    # `accelerate launch --multi_gpu` / torchrun on a machine with no accelerator would each run alone.
    accelerator_api = getattr(torch, "accelerator", None)
    if accelerator_api is not None:
        return accelerator_api.current_accelerator() is not None
    return torch.cuda.is_available()


CURVE_POINTS = 1000


def run_compare(paths: Sequence[str], output_dir: str | os.PathLike) -> int:
    """`--compare`: print and write the comparison table of result records; 2 when a file is not a record."""
    from .compare import compare_files, comparison_csv, comparison_markdown

    try:
        rows = compare_files(paths)
    except ValueError as err:
        print(f"mask2anomaly-eval: {err}", file=sys.stderr)
        return 2
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = comparison_markdown(rows)
    write_text_atomically(output_dir / "comparison.md", markdown)
    write_text_atomically(output_dir / "comparison.csv", comparison_csv(rows))
    print(markdown, end="")
    print(f"{len(rows)} result(s) -> {output_dir / 'comparison.md'}, {output_dir / 'comparison.csv'}")
    return 0


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The command once its arguments are parsed (`cli.build_parser`) and its threads set; returns 0, or 1 when
    some items failed (2 for usage errors)."""
    if args.compare is not None:
        return run_compare(args.compare, args.output_dir)
    missing = [flag for flag, value in (("--model", args.model), ("--benchmark", args.benchmark),
                                        ("--data-dir", args.data_dir)) if not value]
    if missing:
        parser.error(f"{', '.join(missing)} required (or --compare JSON ...)")
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
                               ("--bootstrap", args.bootstrap, 0), ("--visualize", args.visualize, 0)):
        if value is not None and value < least:
            parser.error(f"{flag} {value}: expected at least {least}")
    if args.anomaly_threshold is not None and not args.components:
        parser.error("--anomaly-threshold is the component-metric threshold; it needs --components")
    state = PartialState(cpu=args.cpu or not _has_accelerator())
    try:  # before the evaluation, not after it (every process, so that all stop together)
        check_writable_folder(args.output_dir)
    except ValueError as err:
        print(f"mask2anomaly-eval: --output-dir: {err}", file=sys.stderr)
        return 2
    try:
        benchmark = get_benchmark(args.benchmark, args.data_dir, track=args.track)
    except (ValueError, FileNotFoundError) as err:
        print(f"mask2anomaly-eval: cannot open benchmark {args.benchmark!r} in {args.data_dir!r}: {err}",
              file=sys.stderr)
        return 2
    if benchmark.unlabelled and state.is_main_process:
        print(f"mask2anomaly-eval: {len(benchmark.unlabelled)} image(s) without a label file left out: "
              f"{', '.join(map(os.fspath, benchmark.unlabelled[:5]))}{', ...' if len(benchmark.unlabelled) > 5 else ''}",
              file=sys.stderr)
    try:
        model, processor = load_model_and_processor(args.model, state.device)
    except ModelNotFoundError as err:
        print(f"mask2anomaly-eval: --model: {err}", file=sys.stderr)
        return 2
    all_scorers = args.anomaly_scorer == "all"
    scorers = list(ANOMALY_SCORERS) if all_scorers else [args.anomaly_scorer or processor.anomaly_scorer]
    try:
        results = evaluate_scorers(
            model, processor, benchmark, scorers, mode=args.mode, components=args.components, track=benchmark.track,
            flip_tta=False if args.no_flip else None, refine=False if args.no_refine else None,
            anomaly_threshold=args.anomaly_threshold, batch_size=args.batch_size,
            limit=args.limit, accelerator=state, skip_without_anomaly=benchmark.skip_without_anomaly,
            per_image=True, bootstrap=args.bootstrap, seed=args.seed,
            curve_points=0 if args.no_curves else CURVE_POINTS, visualize=args.visualize,
        )
    except ValueError as err:
        print(f"mask2anomaly-eval: {err}", file=sys.stderr)
        return 1
    failures = next(iter(results.values()))["failures"]
    if state.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        json_paths = []
        for scorer, result in results.items():
            record = result_record(args, benchmark, result)
            stem = results_stem(record, scorer if all_scorers else None)
            title = f"{BENCHMARKS[args.benchmark].title}, {scorer}"
            try:
                _, files_markdown = write_figures(result, output_dir, stem, title, scorer,
                                                  processor.decision_threshold(scorer))
                json_path, markdown_path = write_results(record, output_dir, stem,
                                                         intervals_markdown(record) + files_markdown)
            except OSError as err:  # e.g. the disk filled up during the evaluation: the results still get out
                print(json.dumps(record, allow_nan=False))
                print(f"mask2anomaly-eval: cannot write the results into {args.output_dir} ({err}); they are "
                      f"printed above as JSON", file=sys.stderr)
                state.wait_for_everyone()
                return 1
            json_paths.append(json_path)
            summary = ", ".join(f"{name} {100 * record['metrics'][key]:.2f}" for key, name in
                                PIXEL_METRICS + COMPONENT_METRICS if record["metrics"].get(key) is not None)
            print(f"{stem} ({scorer}): {record['num_images']}/{record['num_items']} images, {summary} (%) "
                  f"in {record['timing']['total_seconds']:.1f}s -> {json_path}, {markdown_path}")
        if all_scorers:
            from .compare import compare_files, comparison_csv, comparison_markdown

            rows = compare_files(json_paths)
            write_text_atomically(output_dir / f"{results_stem(record)}-scorers.md", comparison_markdown(rows))
            write_text_atomically(output_dir / f"{results_stem(record)}-scorers.csv", comparison_csv(rows))
            print(comparison_markdown(rows), end="")
        for failure in failures:
            print(f"failed: {failure['error']}", file=sys.stderr)
    state.wait_for_everyone()
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
