"""Inference drivers: load a model with its processor, pick the device, and run images through the one path
image -> RGB uint8 (once) -> batches of one processed size (once) -> processor -> model -> one-pass
post-processing (`Mask2AnomalyImageProcessor.post_process_anomaly_and_semantic`) -> `AnomalyPrediction`.

Not remote code: the image processor is a pure data transform and never runs a model; this module does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput
from transformers.utils import logging

from .configuration_mask2anomaly import LEGACY_PROCESSOR_KEYS, legacy_processor_settings
from .image_processing_mask2anomaly import ImageLike, Mask2AnomalyImageProcessor, to_rgb_uint8
from .modeling_mask2anomaly import Mask2AnomalyForUniversalSegmentation

logger = logging.get_logger(__name__)

T = TypeVar("T")


@dataclass
class AnomalyPrediction:
    """Prediction for one image, at its original size."""

    anomaly_map: np.ndarray  # (H, W) float32, higher = more anomalous
    semantic_map: np.ndarray  # (H, W) uint8 class ids (int64 when the model has more than 255 classes)


# ------------------------------------------------------------------------------------------------ loading


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`cpu`, `cuda[:i]` or `auto` (cuda when available) as a torch device; cuda without a GPU is an error."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a device; expected cpu, cuda, cuda:N or auto") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asked for CUDA but torch sees no GPU; use --device cpu or auto")
    return resolved


def load_model_and_processor(
    model_name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Mask2AnomalyForUniversalSegmentation, Mask2AnomalyImageProcessor]:
    """
    The model (in eval mode, weights cast to `dtype`, on `device`) and its processor from a folder or a Hub id (the
    Hub cache works offline).

    The processor comes from preprocessor_config.json. Legacy rule: post-processing settings that an older
    config.json still carries (`config.legacy_postprocessing`) fill in only the keys that preprocessor_config.json
    lacks; a folder without preprocessor_config.json gets the official pre-processing with those settings.
    """
    name = os.fspath(model_name_or_path)
    model = Mask2AnomalyForUniversalSegmentation.from_pretrained(name)
    model = model.to(device=device, dtype=dtype).eval()
    legacy = legacy_processor_settings(model.config)
    try:
        saved, _ = Mask2AnomalyImageProcessor.get_image_processor_dict(name)
    except OSError:
        logger.warning(f"{name} has no preprocessor_config.json; using the official pre-processing with the "
                       f"post-processing settings of its config")
        return model, Mask2AnomalyImageProcessor.from_model_config(model.config)
    missing = {key: value for key, value in legacy.items() if key in LEGACY_PROCESSOR_KEYS and key not in saved}
    return model, Mask2AnomalyImageProcessor.from_pretrained(name, **missing)


# ------------------------------------------------------------------------------------------------ batching


def batches_of_equal_size(
    items: Iterable[T], batch_size: int, size_of: Callable[[T], tuple[int, int]]
) -> Iterator[list[T]]:
    """
    Group consecutive `items` into batches of at most `batch_size` items whose `size_of` (the processed size of the
    image) is the same, in input order; items are drawn lazily, one batch (plus the item that closes it) at a time.

    Only images of one processed size share a batch: padding an image to a larger batch-mate's size changes what
    the network sees (and the official evaluation runs one image at a time), so results must not depend on the
    batch size. A change of size closes the batch, so inputs sorted or grouped by size batch best.
    """
    batch: list[T] = []
    batch_key: tuple[int, int] | None = None
    for item in items:
        key = size_of(item)
        if batch and (key != batch_key or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append(item)
        batch_key = key
    if batch:
        yield batch


CPU_REDUCED_PRECISION_WARNING = (
    "the model runs in {dtype} on the CPU: torch's CPU grid_sample (used by the pixel decoder's deformable "
    "attention) returns wrong values, even NaN, for bfloat16 inputs laid out as the decoder lays them out (seen "
    "with torch 2.13); use float32 on the CPU, reduced precision on a GPU"
)


def _input_placement(model: torch.nn.Module, device: str | torch.device | None) -> tuple[torch.device, torch.dtype]:
    """Device (`device`, else the model's) and floating dtype of the model's inputs: those of its first
    floating-point parameter (cpu / float32 for a model without one)."""
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = torch.float32 if parameter is None else parameter.dtype
    if device is None:
        device = torch.device("cpu") if parameter is None else parameter.device
    device = torch.device(device)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        logger.warning_once(CPU_REDUCED_PRECISION_WARNING.format(dtype=dtype))
    return device, dtype


# ------------------------------------------------------------------------------------------------ prediction


def predict_batch(
    model: torch.nn.Module,
    image_processor: Mask2AnomalyImageProcessor,
    images: Sequence[np.ndarray],
    flip_tta: bool,
    refine: bool | None = None,
    scorer: str | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    do_resize: bool | None = None,
) -> list[AnomalyPrediction]:
    """
    Predictions for one batch of (H, W, 3) uint8 RGB `images` of one processed size (as `batches_of_equal_size`
    forms them): one forward pass (two with flip TTA) and one post-processing pass. `model` must be in eval mode.
    """
    by_scorer = predict_batch_scorers(model, image_processor, images, flip_tta, (scorer,), refine=refine,
                                      device=device, dtype=dtype, do_resize=do_resize)
    return [predictions[scorer] for predictions in by_scorer]


def predict_batch_scorers(
    model: torch.nn.Module,
    image_processor: Mask2AnomalyImageProcessor,
    images: Sequence[np.ndarray],
    flip_tta: bool,
    scorers: Sequence[str | None],
    refine: bool | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    do_resize: bool | None = None,
) -> list[dict[str | None, AnomalyPrediction]]:
    """
    `predict_batch` for several scorers sharing the forward pass: per image, ``{scorer: AnomalyPrediction}``, one
    post-processing pass per scorer (None = the processor's `anomaly_scorer`).
    """
    do_resize = image_processor.do_resize if do_resize is None else bool(do_resize)
    original_sizes = [image.shape[:2] for image in images]
    processed_sizes = [image_processor.processed_size(size, do_resize) for size in original_sizes]

    def forward(arrays: Sequence[np.ndarray]) -> Mask2FormerForUniversalSegmentationOutput:
        inputs = image_processor(list(arrays), do_resize=do_resize, return_tensors="pt")
        with torch.no_grad():
            # in the model's dtype, so that bfloat16/float16 models take the float32 pre-processing
            outputs = model(pixel_values=inputs["pixel_values"].to(device=device, dtype=dtype))
        # keep only what post-processing reads
        return Mask2FormerForUniversalSegmentationOutput(class_queries_logits=outputs.class_queries_logits,
                                                         masks_queries_logits=outputs.masks_queries_logits)

    outputs = forward(images)
    # the official script flips the original image (before resizing), not the padded tensor
    flipped = forward([np.ascontiguousarray(image[:, ::-1]) for image in images]) if flip_tta else None
    results: list[dict[str | None, AnomalyPrediction]] = [{} for _ in images]
    for scorer in scorers:
        maps = image_processor.post_process_anomaly_and_semantic(
            outputs, original_sizes, flipped_outputs=flipped, refine=refine, scorer=scorer,
            image_sizes=processed_sizes,
        )
        for result, item in zip(results, maps):
            semantic = item.semantic_map.cpu().numpy()
            if semantic.size == 0 or semantic.max() <= 255:
                semantic = semantic.astype(np.uint8)
            result[scorer] = AnomalyPrediction(item.anomaly_map.float().cpu().numpy(), semantic)
    return results


def iter_predict_anomaly(
    model: torch.nn.Module,
    image_processor: Mask2AnomalyImageProcessor,
    images: ImageLike | Iterable[ImageLike],
    flip_tta: bool | None = None,
    refine: bool | None = None,
    scorer: str | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    do_resize: bool | None = None,
) -> Iterator[AnomalyPrediction]:
    """Generator form of `predict_anomaly`: reads `images` lazily and yields one prediction per image, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    flip_tta = image_processor.flip_tta if flip_tta is None else flip_tta
    do_resize = image_processor.do_resize if do_resize is None else bool(do_resize)
    device, dtype = _input_placement(model, device)
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
        images = [images]

    def processed_size(array: np.ndarray) -> tuple[int, int]:
        return image_processor.processed_size(array.shape[:2], do_resize)

    was_training = model.training
    model.eval()
    try:
        arrays = (to_rgb_uint8(image) for image in images)
        for batch in batches_of_equal_size(arrays, batch_size, processed_size):
            yield from predict_batch(model, image_processor, batch, flip_tta, refine=refine, scorer=scorer,
                                     device=device, dtype=dtype, do_resize=do_resize)
    finally:
        model.train(was_training)


def predict_anomaly(
    model: torch.nn.Module,
    image_processor: Mask2AnomalyImageProcessor,
    images: ImageLike | Iterable[ImageLike],
    flip_tta: bool | None = None,
    refine: bool | None = None,
    scorer: str | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    do_resize: bool | None = None,
) -> list[AnomalyPrediction]:
    """
    Anomaly and semantic maps for images, in one call: pre-process, run `model` in eval mode without gradients,
    post-process, and with flip TTA (default `image_processor.flip_tta`) average with the horizontally flipped
    images' maps flipped back (official: `(a + fliplr(a_flip)) / 2`, refinement per view).

    Args:
        model: a Mask2Anomaly/Mask2Former model returning `class_queries_logits` and `masks_queries_logits`, in any
            floating dtype (`pixel_values` are cast to the dtype of its parameters; the maps are float32).
        image_processor: the model's `Mask2AnomalyImageProcessor`.
        images: one image or an iterable of images (PIL, arrays, tensors or file paths); read lazily, one batch at
            a time, so a generator of many images is fine (use `iter_predict_anomaly` to also get results lazily).
        flip_tta, refine, scorer: override the processor's settings.
        batch_size: at most this many images per forward pass. Only consecutive images of the same processed size
            share a pass (`batches_of_equal_size`): padding to a batch-mate's size would change what the model sees,
            so the results do not depend on `batch_size`.
        device: where the inputs go (default: the model's device).
        do_resize: resize as the processor's `size` says (default: the processor's `do_resize`); False keeps each
            image's own size (still padded to a multiple of `size_divisor`). The processor is not changed.

    Returns:
        `list[AnomalyPrediction]`: per image, in input order, `anomaly_map` (H, W) float32 and `semantic_map` (H, W)
        from the un-flipped view, at the original size.
    """
    return list(iter_predict_anomaly(model, image_processor, images, flip_tta=flip_tta, refine=refine, scorer=scorer,
                                     batch_size=batch_size, device=device, do_resize=do_resize))


__all__ = [
    "AnomalyPrediction",
    "CPU_REDUCED_PRECISION_WARNING",
    "batches_of_equal_size",
    "iter_predict_anomaly",
    "load_model_and_processor",
    "predict_anomaly",
    "predict_batch",
    "predict_batch_scorers",
    "resolve_device",
]
