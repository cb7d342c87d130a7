"""Inference drivers: load a model with its processor, pick the device, and run images through the one path
image -> RGB uint8 (once) -> batches of one processed size (once) -> processor -> model -> one-pass
post-processing (`Mask2AnomalyImageProcessor.post_process_anomaly_and_semantic`) -> `AnomalyPrediction`.

Not remote code: the image processor is a pure data transform and never runs a model; this module does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a model folder nor a Hub id that can be loaded; the message is one line that
    says which (a missing folder, a Hub id not in the local cache with no network, an unknown repository)."""


#: seconds to wait for the Hub's host before saying it cannot be reached (instead of huggingface_hub's retries)
HUB_PROBE_TIMEOUT = 5.0


def _looks_like_path(name: str) -> bool:
    """Whether `name` is written as a path: ``./x``, ``../x``, ``/x``, ``~/x``, ``x/`` or more than one ``/`` (a Hub
    id is ``NAME`` or ``ORG/NAME``)."""
    return (name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def _hub_reachable() -> str | None:
    """None when the Hub's host accepts a connection within `HUB_PROBE_TIMEOUT` seconds (or a proxy is configured,
    which decides itself), else the reason."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError as err:
        return f"{constants.ENDPOINT} cannot be reached ({err.strerror or err})"
    return None


def resolve_model_source(model_name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """
    Where `model_name_or_path` loads from, checked at once, before any download: ``(name, local_files_only)``.

    A folder is taken as is (it must hold a config.json). A name written as a path that is not a folder is "folder
    not found". A Hub id in the local cache loads from it without the network when the Hub is offline or cannot be
    reached; one not in the cache needs the Hub, and without it (``HF_HUB_OFFLINE``, no connection) fails at once
    instead of after huggingface_hub's retries.

    Raises:
        ModelNotFoundError: with a one-line message naming the value and what was expected.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    name = os.fspath(model_name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {name} holds no config.json; expected a save_pretrained folder")
        return str(path), True
    if path.exists():
        raise ModelNotFoundError(f"model {name} is a file; expected a model folder or a Hub id (ORG/NAME)")
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model folder not found: {name}")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelNotFoundError(f"model {name!r} is neither a folder nor a Hub id (ORG/NAME of letters, digits, "
                                 "'-', '_' and '.')") from None
    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise ModelNotFoundError(f"model {name!r} is not a folder, and as a Hub id it is not in the local cache "
                                     f"({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE is set, so it cannot be downloaded")
        return name, True
    unreachable = _hub_reachable()
    if unreachable is None:
        return name, False
    if not cached:
        raise ModelNotFoundError(f"model {name!r} is not a folder, and as a Hub id it is not in the local cache "
                                 f"({constants.HF_HUB_CACHE}) and {unreachable}")
    logger.warning(f"{unreachable}; loading {name} from the local cache")
    return name, True


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

    Raises:
        ModelNotFoundError: (one line, at once) for a missing folder, a Hub id that is not in the local cache when
            the Hub cannot be reached, or a Hub id the Hub does not know (see `resolve_model_source`).
    """
    name, local_files_only = resolve_model_source(model_name_or_path)
    try:
        model = Mask2AnomalyForUniversalSegmentation.from_pretrained(name, local_files_only=local_files_only)
    except OSError as err:
        if local_files_only or Path(name).is_dir():
            raise
        # transformers' message runs over several lines; the one-line gist, with its first line for details
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(f"model {name!r} could not be loaded from the Hub (is the id right? a private or "
                                 f"gated model needs `hf auth login`): {first}") from err
    model = model.to(device=device, dtype=dtype).eval()
    legacy = legacy_processor_settings(model.config)
    try:
        saved, _ = Mask2AnomalyImageProcessor.get_image_processor_dict(name, local_files_only=local_files_only)
    except OSError:
        logger.warning(f"{name} has no preprocessor_config.json; using the official pre-processing with the "
                       f"post-processing settings of its config")
        return model, Mask2AnomalyImageProcessor.from_model_config(model.config)
    missing = {key: value for key, value in legacy.items() if key in LEGACY_PROCESSOR_KEYS and key not in saved}
    return model, Mask2AnomalyImageProcessor.from_pretrained(name, local_files_only=local_files_only, **missing)


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
    "ModelNotFoundError",
    "batches_of_equal_size",
    "iter_predict_anomaly",
    "load_model_and_processor",
    "predict_anomaly",
    "predict_batch",
    "predict_batch_scorers",
    "resolve_device",
    "resolve_model_source",
]
