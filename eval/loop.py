"""The one evaluation loop: a model over labelled images, scored at each image's ORIGINAL size, pixel metrics and
optionally SegmentMeIfYouCan component metrics, sharded over processes and merged.

Used by the benchmark runner (`mask2anomaly-eval`, ``run.py``), by the HF Trainer route's evaluation
(``mask2anomaly_training.trainer``) and by the accelerate script's periodic validation::

    from mask2anomaly_eval.loop import evaluate

    result = evaluate(model, processor, samples, mode="exact", components=True, accelerator=accelerator)
    result["metrics"]  # {"auprc": ..., "fpr95": ..., "auroc": ..., "siou": ..., "ppv": ..., "mean_f1": ...}

Every process takes a strided shard of the samples (``samples[rank::world]``), predicts anomaly maps
``batch_size`` at a time with `modeling_mask2anomaly.inference.predict_batch_scorers` (official pre-processing,
optional flip TTA and refinement; maps at the original size; with several scorers, `evaluate_scorers`, one forward
pass serves them all) and adds them to a streaming `PixelMetricAccumulator`; the accumulators are gathered
and merged, so memory does not grow with the number of pixels and the numbers do not depend on the number of
processes (exactly so in ``exact`` mode). Component metrics need the best-F1 threshold of the pooled pixel curve
before any image can be scored, so each process keeps its shard's maps in a temporary folder during the first
pass and scores them once the merged curve is known. On request it also keeps per-image rows and accumulators
(``per_image``, ``bootstrap``: `mask2anomaly_eval.per_image`, `mask2anomaly_eval.bootstrap`), the thinned pooled
curve (``curve_points``) and the worst and best images (``visualize``).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from modeling_mask2anomaly import ANOMALY_SCORERS, Mask2AnomalyImageProcessor, load_image
from modeling_mask2anomaly.image_processing_mask2anomaly import to_rgb_uint8
from modeling_mask2anomaly.inference import _input_placement, batches_of_equal_size, predict_batch_scorers

from .bootstrap import bootstrap_metrics
from .io import LabelReadError, read_label_png
from .metrics import (
    PIXEL_MODES,
    TRACK_SIZE_THRESHOLDS,
    ComponentMetricAccumulator,
    PixelMetricAccumulator,
    PixelMode,
    Track,
    check_labels,
    merge_accumulators,
)
from .per_image import ExtremeImages, ImageRecord, add_component_frame, image_record

logger = get_logger(__name__)

# Metric keys of the results' "metrics" object, with the names results tables use.
PIXEL_METRICS: tuple[tuple[str, str], ...] = (("auprc", "AuPRC"), ("fpr95", "FPR95"), ("auroc", "AUROC"))
COMPONENT_METRICS: tuple[tuple[str, str], ...] = (("siou", "sIoU"), ("ppv", "PPV"), ("mean_f1", "mean F1"))


@dataclass
class LoadedItem:
    """One benchmark item read and checked: RGB uint8 image (H, W, 3) and 0/1/255 label (H, W)."""

    name: str
    image: np.ndarray
    label: np.ndarray
    index: int = -1  # position in the benchmark


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


def _read_label(source: Any, name: str) -> np.ndarray:
    if isinstance(source, (str, os.PathLike, Image.Image)):
        return read_label_png(source, name=name)
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
    label = _read_label(label_source, name)
    if label.ndim != 2:
        raise ValueError(f"{name}: label has shape {label.shape}; expected a single-channel (H, W) map")
    if label.shape != image.shape[:2]:
        raise ValueError(f"{name}: label is {label.shape[0]}x{label.shape[1]} but the image is "
                         f"{image.shape[0]}x{image.shape[1]} (height x width); expected the same size")
    try:
        label = check_labels(label, name=f"{name}: labels")
    except ValueError as err:
        raise ValueError(str(err)) from None
    return LoadedItem(name, image, label, index)


def _loaded_items(items: Sequence[Any], indices: Sequence[int], failures: list[dict[str, str]],
                  skip_without_anomaly: bool = False) -> Iterator[LoadedItem]:
    for index in indices:
        try:
            # indexing may already read (and convert) the label, so it can fail too
            loaded = load_item(items[index], index)
        except (ValueError, OSError) as err:
            name = _name_at(items, index)
            failure = {"item": name}
            if isinstance(err, LabelReadError):  # the label's fault: reported under the label's path
                failure["label"] = err.path
                message = str(err)
            else:
                message = str(err) if name in str(err) else f"{name}: {err}"
            failure["error"] = message
            failures.append(failure)
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


def _finite(value: Any) -> float | None:
    """A metric as a JSON-safe float (None for NaN: JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class _ScorerRun:
    """What one process accumulates for one scorer."""

    pixel: PixelMetricAccumulator
    direct: ComponentMetricAccumulator | None
    cached: list[tuple[Path, int]] = field(default_factory=list)  # (map file, position in records or -1)
    records: list[ImageRecord] = field(default_factory=list)
    extremes: ExtremeImages = field(default_factory=lambda: ExtremeImages(0))


def evaluate(
    model: torch.nn.Module,
    processor: Mask2AnomalyImageProcessor,
    samples: Sequence[Any],
    *,
    scorer: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate ``model`` on labelled samples at their original size with one anomaly scorer (default: the
    processor's ``anomaly_scorer``); :func:`evaluate_scorers` with one scorer, see there for the options and the
    result."""
    scorer = scorer or processor.anomaly_scorer
    return evaluate_scorers(model, processor, samples, [scorer], **options)[scorer]


def evaluate_scorers(
    model: torch.nn.Module,
    processor: Mask2AnomalyImageProcessor,
    samples: Sequence[Any],
    scorers: Sequence[str],
    *,
    mode: PixelMode = "exact",
    refine: bool | None = None,
    flip_tta: bool | None = None,
    batch_size: int = 1,
    components: bool = False,
    track: Track = "anomaly",
    anomaly_threshold: float | None = None,
    accelerator: Any = None,
    limit: int | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    skip_without_anomaly: bool = False,
    per_image: bool = False,
    bootstrap: int = 0,
    seed: int = 0,
    curve_points: int = 0,
    visualize: int = 0,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` on labelled samples at their original size, with every scorer of ``scorers`` from one
    pass over the frames (each batch is read and forwarded once, then post-processed once per scorer); with
    several processes, each takes a shard and the accumulators are merged, so every process returns the same
    result.

    Args:
        model: a Mask2Anomaly (or Mask2Former) model; run in eval mode without gradients on ``accelerator.device``
            (moved there if needed; a model wrapped by ``accelerator.prepare`` is unwrapped).
        processor: its image processor (pre-processing and anomaly post-processing).
        samples: a sequence (``len`` and indexing; a `datasets.Dataset` works) of items with ``image`` and
            ``label`` (0 inlier, 1 anomaly, 255 void): file paths, PIL images or arrays. See `load_item`.
        scorers: names from the scorer registry (`modeling_mask2anomaly.scorers.ANOMALY_SCORERS`).
        mode: pixel metric mode, ``"exact"`` (scikit-learn values) or ``"smiyc"`` (SegmentMeIfYouCan's binned curve).
        components: also compute sIoU, PPV and mean F1 at the best-F1 threshold of the pixel curve.
        track: component track, ``"anomaly"`` or ``"obstacle"`` (size thresholds).
        anomaly_threshold: score components at ``score > anomaly_threshold`` (one pass, no map kept) instead of
            the pooled pixel curve's best-F1 threshold (the official protocol, the default).
        refine, flip_tta: override the processor's post-processing settings.
        batch_size: images per forward pass (only images of one processed size share one).
        limit: evaluate only the first ``limit`` items.
        accelerator: accelerate's `Accelerator` or `PartialState` (default: the current state; a single process
            when not launched).
        progress: show a tqdm progress bar on the main process.
        cache_dir: where the component pass keeps anomaly maps (default: a temporary folder, removed after).
        skip_without_anomaly: leave out items whose label has no anomaly pixel (StreetHazards' convention).
        per_image: also return one row per image (`mask2anomaly_eval.per_image.ImageRecord`).
        bootstrap: number of bootstrap resamples of the images (0: none), drawn with ``seed``; the intervals come
            from per-image accumulators (`mask2anomaly_eval.bootstrap`).
        curve_points: return the pooled curve thinned to a ``curve_points`` grid (0: none), for plotting.
        visualize: keep the ``visualize`` images with the lowest and the highest per-image AuPRC, with their maps.

    Returns:
        On every process, per scorer the same dict: ``metrics`` (fractions; NaN-free: undefined values are None),
        ``pixel`` and ``component`` (everything the accumulators compute), ``num_images`` (evaluated),
        ``num_items``, ``failures`` (``[{"item", "error"}]``), ``options`` and ``timing``; with the options also
        ``per_image`` (rows), ``bootstrap`` (intervals), ``curve`` and ``extreme_images`` ((worst, best) lists of
        ``(auprc, index, name, image, anomaly_map)``).
    """
    if mode not in PIXEL_MODES:
        raise ValueError(f"mode={mode!r}; expected one of {PIXEL_MODES}")
    if track not in TRACK_SIZE_THRESHOLDS:
        raise ValueError(f"track={track!r}; expected one of {tuple(TRACK_SIZE_THRESHOLDS)}")
    if not scorers:
        raise ValueError(f"no scorer given; expected names from {ANOMALY_SCORERS}")
    for scorer in scorers:
        if scorer not in ANOMALY_SCORERS:
            raise ValueError(f"scorer={scorer!r}; expected one of {ANOMALY_SCORERS}")
    if len(set(scorers)) != len(scorers):
        raise ValueError(f"scorers {list(scorers)} name one scorer twice; expected distinct names")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected at least 1")
    if bootstrap < 0 or visualize < 0 or curve_points < 0:
        raise ValueError(f"bootstrap={bootstrap}, visualize={visualize}, curve_points={curve_points}; expected "
                         "counts >= 0")
    state = accelerator if accelerator is not None else PartialState()
    if hasattr(state, "unwrap_model"):
        model = state.unwrap_model(model)
    flip_tta = processor.flip_tta if flip_tta is None else flip_tta
    refine = processor.refine if refine is None else refine
    num_items = len(samples) if limit is None else min(limit, len(samples))
    indices = list(range(state.process_index, num_items, state.num_processes))
    model = model.to(state.device)
    device, dtype = _input_placement(model, state.device)
    keep_records = per_image or bootstrap > 0 or visualize > 0

    start = time.perf_counter()
    failures: list[dict[str, str]] = []
    # without a given threshold, the components wait for the merged pixel curve: each shard's maps are kept
    two_pass = components and anomaly_threshold is None
    one_pass_components = components and not two_pass
    runs = {
        scorer: _ScorerRun(PixelMetricAccumulator(mode),
                           ComponentMetricAccumulator(track, anomaly_threshold) if one_pass_components else None,
                           extremes=ExtremeImages(visualize))
        for scorer in scorers
    }
    own_cache = two_pass and cache_dir is None
    cache = None
    if two_pass:
        cache = Path(tempfile.mkdtemp(prefix="mask2anomaly-eval-")) if own_cache else Path(cache_dir)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=num_items, desc="evaluating", unit="img", disable=not (progress and state.is_main_process))
        loaded = _loaded_items(samples, indices, failures, skip_without_anomaly)
        for batch in batches_of_equal_size(loaded, batch_size, lambda item: processor.processed_size(
                item.image.shape[:2])):
            predictions = predict_batch_scorers(model, processor, [item.image for item in batch], flip_tta, scorers,
                                                refine=refine, device=device, dtype=dtype)
            for item, by_scorer in zip(batch, predictions):
                for scorer, run in runs.items():
                    anomaly_map = by_scorer[scorer].anomaly_map
                    run.pixel.add(anomaly_map, item.label)
                    record = None
                    if keep_records:
                        record = image_record(item.index, item.name, anomaly_map, item.label,
                                              keep_state=bootstrap > 0, mode=mode)
                        run.records.append(record)
                        run.extremes.add(record, item.image, anomaly_map)
                    if run.direct is not None:
                        add_component_frame(run.direct, anomaly_map, item.label, record if bootstrap else None)
                    if cache is not None:
                        # kept for the component pass: the threshold is known only once every shard's curve is merged
                        path = cache / f"{state.process_index}-{scorers.index(scorer)}-{len(run.cached)}.npz"
                        np.savez(path, scores=anomaly_map, labels=item.label)
                        run.cached.append((path, len(run.records) - 1 if bootstrap else -1))
            # the bar counts every process's images, assuming the shards advance together
            bar.update(min(len(batch) * state.num_processes, num_items - bar.n))
        bar.close()
        inference_seconds = time.perf_counter() - start

        gathered_failures = gather_object([failures])
        failures = [failure for part in gathered_failures for failure in part]
        results = {}
        for scorer, run in runs.items():
            results[scorer] = _finish_scorer(
                run, scorer, state, failures, num_items, mode=mode, components=components, track=track,
                anomaly_threshold=anomaly_threshold, per_image=per_image, bootstrap=bootstrap, seed=seed,
                curve_points=curve_points, visualize=visualize, progress=progress)
    finally:
        model.train(was_training)
        if own_cache and cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
        else:
            for run in runs.values():
                for path, _ in run.cached:
                    path.unlink(missing_ok=True)
    total_seconds = time.perf_counter() - start
    for result in results.values():
        result["options"].update({"flip_tta": bool(flip_tta), "refine": bool(refine), "batch_size": batch_size,
                                  "limit": limit, "num_processes": state.num_processes,
                                  "scorers_in_pass": list(scorers)})
        result["timing"] = {"inference_seconds": round(inference_seconds, 3),
                            "total_seconds": round(total_seconds, 3),
                            "seconds_per_image": round(total_seconds / max(result["num_images"], 1), 4)}
    return results


def _finish_scorer(run: _ScorerRun, scorer: str, state: Any, failures: list[dict[str, str]], num_items: int, *,
                   mode: str, components: bool, track: str, anomaly_threshold: float | None, per_image: bool,
                   bootstrap: int, seed: int, curve_points: int, visualize: int, progress: bool) -> dict[str, Any]:
    """Merge one scorer's shards and compute its metrics (the component pass first, for the two-pass protocol)."""
    gathered = gather_object([(run.pixel, run.records, run.extremes)])
    pixel = merge_accumulators([part for part, _, _ in gathered])
    shard_records = [part for _, part, _ in gathered]
    shard_extremes = [part for _, _, part in gathered]
    if pixel.num_images == 0:
        raise ValueError(f"no benchmark item could be evaluated ({len(failures)} failed, {num_items} in total); "
                         f"first failure: {failures[0]['error'] if failures else 'the benchmark is empty'}")
    pixel_result = pixel.compute(curve_points)
    curve = pixel_result.pop("curve", None)
    metrics = {key: _finite(pixel_result[key]) for key, _ in PIXEL_METRICS}
    component_result = None
    threshold = pixel_result.get("best_f1_threshold") if anomaly_threshold is None else anomaly_threshold
    if components and (threshold is None or not math.isfinite(threshold)):
        logger.warning("the pixel curve has no best-F1 threshold (no anomaly pixel?): component metrics undefined")
        metrics.update({key: None for key, _ in COMPONENT_METRICS})
    elif components:
        component = run.direct or ComponentMetricAccumulator(track, float(threshold))  # type: ignore[arg-type]
        for path, position in run.cached:
            with np.load(path) as data:
                add_component_frame(component, data["scores"], data["labels"],
                                    run.records[position] if position >= 0 else None)
        if bootstrap and run.cached:
            shard_records = gather_object([run.records])  # they now hold their component states too
        component = merge_accumulators(gather_object([component]))
        component_result = component.compute()
        component_result["track"] = track
        metrics.update({key: _finite(component_result[key]) for key, _ in COMPONENT_METRICS})
    records = sorted((record for part in shard_records for record in part), key=lambda record: record.index)
    result: dict[str, Any] = {
        "metrics": metrics,
        "pixel": _jsonable(pixel_result),
        "component": _jsonable(component_result),
        "num_images": pixel.num_images,
        "num_items": num_items,
        "failures": failures,
        "options": {"mode": mode, "components": components, "track": track, "scorer": scorer,
                    "anomaly_threshold": anomaly_threshold},
    }
    if per_image:
        result["per_image"] = [_jsonable(record.row()) for record in records]
    if bootstrap:
        component_states = ([record.component_state for record in records]
                            if component_result is not None else None)
        intervals = bootstrap_metrics([record.pixel_state for record in records], component_states,
                                      num_resamples=bootstrap, seed=seed,
                                      progress=progress and state.is_main_process)
        intervals.pop("values")
        result["bootstrap"] = _jsonable(intervals)
    if curve is not None:
        result["curve"] = curve
    if visualize:
        extremes = ExtremeImages(visualize)
        for part in shard_extremes:
            extremes.merge(part)
        result["extreme_images"] = extremes.worst_and_best()
    return result


def evaluate_splits(
    model: torch.nn.Module,
    processor: Mask2AnomalyImageProcessor,
    splits: Mapping[str, Sequence[Any]],
    **options: Any,
) -> dict[str, float]:
    """Pixel metrics of several labelled splits as one flat dict, ``{split}_auprc``, ``{split}_fpr95`` and
    ``{split}_auroc`` (fractions; NaN where undefined), for training-time validation.

    ``options`` are those of :func:`evaluate` (``mode``, ``scorer``, ``refine``, ``flip_tta``, ``batch_size``,
    ``accelerator``, ``limit``, ...). A validation image that cannot be evaluated raises ``ValueError`` naming it
    (on every process alike), since a validation split is expected to be clean.
    """
    values: dict[str, float] = {}
    for name, samples in splits.items():
        result = evaluate(model, processor, samples, **options)
        if result["failures"]:
            raise ValueError(f"validation split {name!r}: {len(result['failures'])} image(s) could not be evaluated; "
                             f"first: {result['failures'][0]['error']}")
        for key, _ in PIXEL_METRICS:
            value = result["metrics"][key]
            values[f"{name}_{key}"] = float("nan") if value is None else value
    return values


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
