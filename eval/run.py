"""`mask2anomaly-eval`: run a Mask2Anomaly model over an anomaly-segmentation benchmark and write its metrics.

    mask2anomaly-eval --model DIR_OR_HUB_ID --benchmark smiyc_ra21 --data-dir data/RoadAnomaly21 --output-dir results/
    accelerate launch --multi_gpu --num_processes 2 -m mask2anomaly_eval.run --model ... --benchmark ... --data-dir ...

(``--multi_gpu`` also on a machine without accelerator, where it gives a CPU process group; accelerate's ``--cpu``
starts a single process.)

Every process takes a strided shard of the images (``items[rank::world]``), predicts anomaly maps `--batch-size`
at a time (`iter_predict_anomaly`: official pre-processing, optional flip TTA and refinement) and adds them to a
streaming `PixelMetricAccumulator`; the accumulators are gathered and merged, so memory does not grow with the
number of pixels and the numbers do not depend on the number of processes (exactly so in ``exact`` mode).

Component metrics (``--components``: sIoU, PPV, mean F1 as SegmentMeIfYouCan defines them) need the best-F1
threshold of the pooled pixel curve before any image can be scored, so each process keeps its shard's anomaly maps
in a temporary folder during the first pass and scores them in a second pass once the merged curve is known; the
track (component size thresholds) is the benchmark reader's: ``obstacle`` for RoadObstacle21, ``anomaly`` otherwise.

Items that cannot be evaluated (unreadable image or label, label values other than 0/1/255, label size different
from the image's) are reported with the reason and skipped; the run goes on and exits with status 1 at the end.
Outputs: ``<output-dir>/<benchmark>.json`` (metrics as fractions, model, benchmark, options, image counts,
failures, timing) and ``<output-dir>/<benchmark>.md`` (a markdown table), each written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from modeling_mask2anomaly.atomic_io import write_text_atomically
from modeling_mask2anomaly.image_processing_mask2anomaly import Mask2AnomalyImageProcessor, load_image, to_rgb_uint8
from modeling_mask2anomaly.inference import iter_predict_anomaly, load_model_and_processor
from modeling_mask2anomaly.scorers import ANOMALY_SCORERS

from .datasets import get_benchmark
from .metrics import (
    PIXEL_MODES,
    TRACK_SIZE_THRESHOLDS,
    ComponentMetricAccumulator,
    PixelMetricAccumulator,
    merge_accumulators,
)
from .pixel_metrics import check_labels

logger = get_logger(__name__)

# Metric keys of the results' "metrics" object, with the names the markdown table uses.
PIXEL_METRICS: tuple[tuple[str, str], ...] = (("auprc", "AuPRC"), ("fpr95", "FPR95"), ("auroc", "AUROC"))
COMPONENT_METRICS: tuple[tuple[str, str], ...] = (("siou", "sIoU"), ("ppv", "PPV"), ("mean_f1", "mean F1"))
# How results tables and model cards name the benchmarks of `mask2anomaly_eval.datasets`.
BENCHMARK_NAMES: dict[str, str] = {
    "smiyc_ra21": "SMIYC RoadAnomaly21 (validation)",
    "smiyc_ro21": "SMIYC RoadObstacle21 (validation)",
    "fs_lostandfound": "Fishyscapes Lost & Found (validation)",
    "fs_static": "Fishyscapes Static (validation)",
    "road_anomaly": "Road Anomaly",
    "streethazards": "StreetHazards (test)",
    "synthroad": "SynthRoad",
}


# ------------------------------------------------------------------------------------------------ items


@dataclass
class LoadedItem:
    """One benchmark item read and checked: RGB uint8 image (H, W, 3) and 0/1/255 label (H, W)."""

    name: str
    image: np.ndarray
    label: np.ndarray


def _field(item: Any, *names: str) -> Any:
    for name in names:
        if isinstance(item, Mapping):
            if name in item:
                return item[name]
        elif hasattr(item, name):
            return getattr(item, name)
    return None


def item_name(item: Any, index: int) -> str:
    """A readable name of a benchmark item (its ``name``, or its image file's name, or its index)."""
    name = _field(item, "name", "id", "stem")
    if name is not None:
        return str(name)
    source = _field(item, "image_path", "image")
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"item {index}"


def _read_label(source: Any) -> np.ndarray:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            with Image.open(path) as opened:
                return np.array(opened)
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"cannot read label {path!r}: {err}") from err
    if isinstance(source, Image.Image):
        return np.array(source)
    if hasattr(source, "detach"):
        return source.detach().cpu().numpy()
    return np.asarray(source)


def load_item(item: Any, index: int) -> LoadedItem:
    """Read one benchmark item: a mapping or object with ``image`` and ``label`` (file paths, PIL images or arrays;
    ``image_path`` and ``labels``/``label_path`` also accepted, as in the readers' `BenchmarkFrame`, or a
    ``load_label()`` method).

    Raises ``ValueError`` naming the item and what is wrong (unreadable file, label values other than 0/1/255,
    label size different from the image's).
    """
    name = item_name(item, index)
    image_source = _field(item, "image", "image_path")
    if image_source is None:
        raise ValueError(f"{name}: no 'image' in the benchmark item; expected an image file, PIL image or array")
    if isinstance(image_source, (str, os.PathLike)):
        image = to_rgb_uint8(load_image(image_source))
    else:
        image = to_rgb_uint8(image_source)
    loader = _field(item, "load_label")
    label_source = loader() if callable(loader) else _field(item, "label", "labels", "label_path")
    if label_source is None:
        raise ValueError(f"{name}: no 'label' in the benchmark item; expected a 0/1/255 label map")
    label = _read_label(label_source)
    if label.ndim != 2:
        raise ValueError(f"{name}: label has shape {label.shape}; expected a single-channel (H, W) map")
    if label.shape != image.shape[:2]:
        raise ValueError(f"{name}: label is {label.shape[0]}x{label.shape[1]} but the image is "
                         f"{image.shape[0]}x{image.shape[1]} (height x width); expected the same size")
    try:
        label = check_labels(label, name=f"{name}: labels")
    except ValueError as err:
        raise ValueError(str(err)) from None
    return LoadedItem(name, image, label)


def _loaded_items(items: Sequence[Any], indices: Sequence[int], failures: list[dict[str, str]],
                  skip_without_anomaly: bool = False) -> Iterator[LoadedItem]:
    for index in indices:
        try:
            # indexing may already read (and convert) the label, so it can fail too
            loaded = load_item(items[index], index)
        except (ValueError, OSError) as err:
            name = _name_at(items, index)
            message = str(err) if name in str(err) else f"{name}: {err}"
            failures.append({"item": name, "error": message})
            logger.warning(f"skipped: {message}")
            continue
        if skip_without_anomaly and not (loaded.label == 1).any():
            continue  # e.g. StreetHazards frames without anomaly, which the benchmark leaves out
        yield loaded


def _name_at(items: Sequence[Any], index: int) -> str:
    paths = getattr(items, "image_paths", None)  # benchmark readers list their image files without reading them
    if paths is not None:
        return os.fspath(paths[index])
    try:
        return item_name(items[index], index)
    except (ValueError, OSError):
        return f"item {index}"


def _batched(iterable: Iterator[LoadedItem], size: int) -> Iterator[list[LoadedItem]]:
    batch: list[LoadedItem] = []
    for element in iterable:
        batch.append(element)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------------ evaluation


def _finite(value: Any) -> float | None:
    """A metric as a JSON-safe float (None for NaN: JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def evaluate_model(
    model: torch.nn.Module,
    processor: Mask2AnomalyImageProcessor,
    benchmark_items: Sequence[Any],
    *,
    mode: str = "exact",
    components: bool = False,
    track: str = "anomaly",
    flip_tta: bool | None = None,
    refine: bool | None = None,
    scorer: str | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    state: PartialState | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    skip_without_anomaly: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on benchmark items; with several processes, each takes a shard and results are merged.

    Args:
        model: a Mask2Anomaly (or Mask2Former) model; run in eval mode without gradients on ``state.device``
            (moved there if needed) — pass the unwrapped model when it was prepared by accelerate.
        processor: its image processor (pre-processing and anomaly post-processing).
        benchmark_items: a sequence (``len`` and indexing; a `datasets.Dataset` works) of items with ``image`` and
            ``label`` (0 inlier, 1 anomaly, 255 void): file paths, PIL images or arrays. See `load_item`.
        mode: pixel metric mode, ``"exact"`` (scikit-learn values) or ``"smiyc"`` (SegmentMeIfYouCan's binned curve).
        components: also compute sIoU, PPV and mean F1 at the best-F1 threshold of the pixel curve.
        track: component track, ``"anomaly"`` or ``"obstacle"`` (size thresholds).
        flip_tta, refine, scorer: override the processor's post-processing settings.
        batch_size: images per forward pass.
        limit: evaluate only the first ``limit`` items.
        state: accelerate's `PartialState` or `Accelerator` (default: the current state; a single process when
            not launched).
        progress: show a tqdm progress bar on the main process.
        cache_dir: where the component pass keeps anomaly maps (default: a temporary folder, removed after).
        skip_without_anomaly: leave out items whose label has no anomaly pixel (StreetHazards' convention).

    Returns:
        On every process, the same dict: ``metrics`` (fractions; NaN-free: undefined values are None), ``pixel``
        and ``component`` (everything the accumulators compute), ``num_images`` (evaluated), ``num_items``,
        ``failures`` (``[{"item", "error"}]``), ``options`` and ``timing``.
    """
    if mode not in PIXEL_MODES:
        raise ValueError(f"mode={mode!r}; expected one of {PIXEL_MODES}")
    if track not in TRACK_SIZE_THRESHOLDS:
        raise ValueError(f"track={track!r}; expected one of {tuple(TRACK_SIZE_THRESHOLDS)}")
    if scorer is not None and scorer not in ANOMALY_SCORERS:
        raise ValueError(f"scorer={scorer!r}; expected one of {ANOMALY_SCORERS}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected at least 1")
    state = state or PartialState()
    flip_tta = processor.flip_tta if flip_tta is None else flip_tta
    refine = processor.refine if refine is None else refine
    scorer = scorer or processor.anomaly_scorer
    num_items = len(benchmark_items) if limit is None else min(limit, len(benchmark_items))
    indices = list(range(state.process_index, num_items, state.num_processes))
    model = model.to(state.device)

    start = time.perf_counter()
    pixel = PixelMetricAccumulator(mode)
    failures: list[dict[str, str]] = []
    own_cache = components and cache_dir is None
    cache = None
    if components:
        cache = Path(tempfile.mkdtemp(prefix="mask2anomaly-eval-")) if own_cache else Path(cache_dir)
    cached: list[Path] = []
    try:
        bar = tqdm(total=num_items, desc="evaluating", unit="img", disable=not (progress and state.is_main_process))
        for batch in _batched(_loaded_items(benchmark_items, indices, failures, skip_without_anomaly), batch_size):
            predictions = iter_predict_anomaly(model, processor, [item.image for item in batch], flip_tta=flip_tta,
                                               refine=refine, scorer=scorer, batch_size=len(batch),
                                               device=state.device)
            for item, prediction in zip(batch, predictions):
                pixel.add(prediction.anomaly_map, item.label)
                if cache is not None:
                    # kept for the component pass: the threshold is known only once every shard's curve is merged
                    path = cache / f"{state.process_index}-{len(cached)}.npz"
                    np.savez(path, scores=prediction.anomaly_map, labels=item.label)
                    cached.append(path)
            # the bar counts every process's images, assuming the shards advance together
            bar.update(min(len(batch) * state.num_processes, num_items - bar.n))
        bar.close()
        inference_seconds = time.perf_counter() - start

        gathered = gather_object([(pixel, failures)])
        pixel = merge_accumulators([part for part, _ in gathered])
        failures = [failure for _, part in gathered for failure in part]
        if pixel.num_images == 0:
            raise ValueError(f"no benchmark item could be evaluated ({len(failures)} failed, {num_items} in total); "
                             f"first failure: {failures[0]['error'] if failures else 'the benchmark is empty'}")
        pixel_result = pixel.compute()
        metrics = {key: _finite(pixel_result[key]) for key, _ in PIXEL_METRICS}
        component_result = None
        threshold = pixel_result.get("best_f1_threshold")
        if components and (threshold is None or not math.isfinite(threshold)):
            logger.warning("the pixel curve has no best-F1 threshold (no anomaly pixel?): component metrics undefined")
            metrics.update({key: None for key, _ in COMPONENT_METRICS})
        elif components:
            component = ComponentMetricAccumulator(track, float(threshold))
            for path in cached:
                with np.load(path) as data:
                    component.add(data["scores"], data["labels"])
            component = merge_accumulators(gather_object([component]))
            component_result = component.compute()
            component_result["track"] = track
            metrics.update({key: _finite(component_result[key]) for key, _ in COMPONENT_METRICS})
    finally:
        if own_cache and cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
        else:
            for path in cached:
                path.unlink(missing_ok=True)
    total_seconds = time.perf_counter() - start
    return {
        "metrics": metrics,
        "pixel": _jsonable(pixel_result),
        "component": _jsonable(component_result),
        "num_images": pixel.num_images,
        "num_items": num_items,
        "failures": failures,
        "options": {"mode": mode, "components": components, "track": track, "flip_tta": bool(flip_tta),
                    "refine": bool(refine), "scorer": scorer, "batch_size": batch_size, "limit": limit,
                    "num_processes": state.num_processes},
        "timing": {"inference_seconds": round(inference_seconds, 3), "total_seconds": round(total_seconds, 3),
                   "seconds_per_image": round(total_seconds / max(pixel.num_images, 1), 4)},
    }


def _jsonable(value: Any) -> Any:
    """Numpy scalars/arrays to Python values and NaN/inf to None, so the result is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
        f"### {record['benchmark_name']} — `{record['model']}`",
        "",
        f"{record['num_images']} of {record['num_items']} images, mode `{options['mode']}`, flip TTA "
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


def write_results(record: Mapping[str, Any], output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<benchmark>.json`` and ``<benchmark>.md`` into ``output_dir`` (atomically); return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / f"{record['benchmark']}.json"
    markdown_path = output_dir / f"{record['benchmark']}.md"
    write_text_atomically(json_path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    write_text_atomically(markdown_path, results_markdown(record))
    return json_path, markdown_path


# ------------------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mask2anomaly-eval",
        description="Evaluate a Mask2Anomaly model on an anomaly-segmentation benchmark (AuPRC, FPR95, AUROC and "
                    "optionally SegmentMeIfYouCan component metrics). Multi-process with `accelerate launch`.")
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("--benchmark", required=True, help="benchmark name (e.g. smiyc_ra21, fs_lostandfound, "
                        "road_anomaly, synthroad)")
    parser.add_argument("--data-dir", required=True, help="the benchmark's local folder, in its official layout")
    parser.add_argument("--output-dir", default="outputs/eval", help="receives <benchmark>.json and <benchmark>.md")
    parser.add_argument("--mode", choices=("exact", "smiyc"), default="exact",
                        help="pixel metrics: exact (scikit-learn values) or smiyc (the benchmark's binned curve)")
    parser.add_argument("--components", action="store_true", help="also compute sIoU, PPV and mean F1")
    parser.add_argument("--track", choices=tuple(TRACK_SIZE_THRESHOLDS), default=None,
                        help="component track (size thresholds); default: the benchmark's (obstacle for smiyc_ro21), "
                             "e.g. obstacle for SynthRoad's obstacle split")
    parser.add_argument("--no-flip", action="store_true", help="disable flip test-time augmentation")
    parser.add_argument("--no-refine", action="store_true", help="disable mask refinement")
    parser.add_argument("--scorer", choices=ANOMALY_SCORERS, default=None, help="anomaly scorer (default: the "
                        "processor's)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if an accelerator is available")
    return parser


def _has_accelerator() -> bool:
    # accelerate only sets up a multi-process CPU group (gloo) when told cpu=True; without it, processes started by
    # `accelerate launch --multi_gpu` / torchrun on a machine with no accelerator would each run alone.
    accelerator_api = getattr(torch, "accelerator", None)
    if accelerator_api is not None:
        return accelerator_api.current_accelerator() is not None
    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mask2anomaly-eval`; returns 0, or 1 when some items failed (2 for usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: expected at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit {args.limit}: expected at least 1")
    state = PartialState(cpu=args.cpu or not _has_accelerator())
    try:
        benchmark = get_benchmark(args.benchmark, args.data_dir, track=args.track)
    except (ValueError, FileNotFoundError) as err:
        print(f"mask2anomaly-eval: cannot open benchmark {args.benchmark!r} in {args.data_dir!r}: {err}",
              file=sys.stderr)
        return 2
    model, processor = load_model_and_processor(args.model, state.device)
    try:
        result = evaluate_model(
            model, processor, benchmark, mode=args.mode, components=args.components, track=benchmark.track,
            flip_tta=False if args.no_flip else None, refine=False if args.no_refine else None, scorer=args.scorer,
            batch_size=args.batch_size, limit=args.limit, state=state,
            skip_without_anomaly=benchmark.skip_without_anomaly,
        )
    except ValueError as err:
        print(f"mask2anomaly-eval: {err}", file=sys.stderr)
        return 1
    record = {"model": args.model, "benchmark": args.benchmark,
              "benchmark_name": BENCHMARK_NAMES.get(args.benchmark, args.benchmark),
              "data_dir": os.path.abspath(args.data_dir), "mode": args.mode, **result}
    if state.is_main_process:
        json_path, markdown_path = write_results(record, args.output_dir)
        summary = ", ".join(f"{name} {100 * record['metrics'][key]:.2f}" for key, name in
                            PIXEL_METRICS + COMPONENT_METRICS if record["metrics"].get(key) is not None)
        print(f"{args.benchmark}: {record['num_images']}/{record['num_items']} images, {summary} (%) "
              f"in {record['timing']['total_seconds']:.1f}s -> {json_path}, {markdown_path}")
        for failure in record["failures"]:
            print(f"failed: {failure['error']}", file=sys.stderr)
    state.wait_for_everyone()
    return 1 if record["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
