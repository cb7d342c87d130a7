"""The one evaluation loop: a model over labelled images, scored at each image's ORIGINAL size, pixel metrics and
optionally SegmentMeIfYouCan component metrics, sharded over processes and merged.

Used by the benchmark runner (`mask2anomaly-eval`, ``run.py``), by the HF Trainer route's evaluation
(``mask2anomaly_training.trainer``) and by the accelerate script's periodic validation::

    from mask2anomaly_eval.loop import evaluate

    result = evaluate(model, processor, samples, mode="exact", components=True, accelerator=accelerator)
    result["metrics"]  # {"auprc": ..., "fpr95": ..., "auroc": ..., "siou": ..., "ppv": ..., "mean_f1": ...}

Every process takes a strided shard of the samples (``samples[rank::world]``), predicts anomaly maps
``batch_size`` at a time with `iter_predict_anomaly` (official pre-processing, optional flip TTA and refinement;
maps at the original size) and adds them to a streaming `PixelMetricAccumulator`; the accumulators are gathered
and merged, so memory does not grow with the number of pixels and the numbers do not depend on the number of
processes (exactly so in ``exact`` mode). Component metrics need the best-F1 threshold of the pooled pixel curve
before any image can be scored, so each process keeps its shard's maps in a temporary folder during the first
pass and scores them once the merged curve is known.
"""

from __future__ import annotations

import math
import os
import shutil
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

from modeling_mask2anomaly import ANOMALY_SCORERS, Mask2AnomalyImageProcessor, iter_predict_anomaly, load_image
from modeling_mask2anomaly.image_processing_mask2anomaly import to_rgb_uint8

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
    return LoadedItem(name, image, label)


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


def _batched(iterable: Iterator[LoadedItem], size: int) -> Iterator[list[LoadedItem]]:
    batch: list[LoadedItem] = []
    for element in iterable:
        batch.append(element)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _finite(value: Any) -> float | None:
    """A metric as a JSON-safe float (None for NaN: JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def evaluate(
    model: torch.nn.Module,
    processor: Mask2AnomalyImageProcessor,
    samples: Sequence[Any],
    *,
    mode: PixelMode = "exact",
    scorer: str | None = None,
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
) -> dict[str, Any]:
    """Evaluate ``model`` on labelled samples at their original size; with several processes, each takes a shard
    and the accumulators are merged, so every process returns the same result.

    Args:
        model: a Mask2Anomaly (or Mask2Former) model; run in eval mode without gradients on ``accelerator.device``
            (moved there if needed; a model wrapped by ``accelerator.prepare`` is unwrapped).
        processor: its image processor (pre-processing and anomaly post-processing).
        samples: a sequence (``len`` and indexing; a `datasets.Dataset` works) of items with ``image`` and
            ``label`` (0 inlier, 1 anomaly, 255 void): file paths, PIL images or arrays. See `load_item`.
        mode: pixel metric mode, ``"exact"`` (scikit-learn values) or ``"smiyc"`` (SegmentMeIfYouCan's binned curve).
        components: also compute sIoU, PPV and mean F1 at the best-F1 threshold of the pixel curve.
        track: component track, ``"anomaly"`` or ``"obstacle"`` (size thresholds).
        anomaly_threshold: score components at ``score > anomaly_threshold`` (one pass, no map kept) instead of
            the pooled pixel curve's best-F1 threshold (the official protocol, the default).
        scorer, refine, flip_tta: override the processor's post-processing settings (see `iter_predict_anomaly`).
        batch_size: images per forward pass.
        limit: evaluate only the first ``limit`` items.
        accelerator: accelerate's `Accelerator` or `PartialState` (default: the current state; a single process
            when not launched).
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
    state = accelerator if accelerator is not None else PartialState()
    if hasattr(state, "unwrap_model"):
        model = state.unwrap_model(model)
    flip_tta = processor.flip_tta if flip_tta is None else flip_tta
    refine = processor.refine if refine is None else refine
    scorer = scorer or processor.anomaly_scorer
    num_items = len(samples) if limit is None else min(limit, len(samples))
    indices = list(range(state.process_index, num_items, state.num_processes))
    model = model.to(state.device)

    start = time.perf_counter()
    pixel = PixelMetricAccumulator(mode)
    failures: list[dict[str, str]] = []
    # without a given threshold, the components wait for the merged pixel curve: each shard's maps are kept
    two_pass = components and anomaly_threshold is None
    direct = ComponentMetricAccumulator(track, anomaly_threshold) if components and not two_pass else None
    own_cache = two_pass and cache_dir is None
    cache = None
    if two_pass:
        cache = Path(tempfile.mkdtemp(prefix="mask2anomaly-eval-")) if own_cache else Path(cache_dir)
    cached: list[Path] = []
    try:
        bar = tqdm(total=num_items, desc="evaluating", unit="img", disable=not (progress and state.is_main_process))
        for batch in _batched(_loaded_items(samples, indices, failures, skip_without_anomaly), batch_size):
            predictions = iter_predict_anomaly(model, processor, [item.image for item in batch], flip_tta=flip_tta,
                                               refine=refine, scorer=scorer, batch_size=len(batch),
                                               device=state.device)
            for item, prediction in zip(batch, predictions):
                pixel.add(prediction.anomaly_map, item.label)
                if direct is not None:
                    direct.add(prediction.anomaly_map, item.label)
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
        threshold = pixel_result.get("best_f1_threshold") if anomaly_threshold is None else anomaly_threshold
        if components and (threshold is None or not math.isfinite(threshold)):
            logger.warning("the pixel curve has no best-F1 threshold (no anomaly pixel?): component metrics undefined")
            metrics.update({key: None for key, _ in COMPONENT_METRICS})
        elif components:
            component = direct or ComponentMetricAccumulator(track, float(threshold))
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
                    "refine": bool(refine), "scorer": scorer, "anomaly_threshold": anomaly_threshold,
                    "batch_size": batch_size, "limit": limit,
                    "num_processes": state.num_processes},
        "timing": {"inference_seconds": round(inference_seconds, 3), "total_seconds": round(total_seconds, 3),
                   "seconds_per_image": round(total_seconds / max(pixel.num_images, 1), 4)},
    }


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
