"""Image processor of Mask2Anomaly: official test-time pre-processing and mask-level anomaly post-processing.

Pre-processing reproduces the released models' detectron2 pipeline (RGB, detectron2 ``ResizeShortestEdge``
with PIL bilinear on uint8, ImageNet mean/std on the 0-255 scale, zero padding to a multiple of 32 after
normalising) and turns training label maps into Mask2Former targets plus ``outlier_labels`` (label 254).

Post-processing turns ``class_queries_logits`` (B, Q, C+1) and ``masks_queries_logits`` (B, Q, Hp/4, Wp/4)
into per-pixel anomaly maps and semantic maps in the official order of operations (upsample the mask logits
to the padded input size, sigmoid, class-weighted sum, crop, resize to the original size, score, refine),
computed in blocks of rows so that memory stays bounded at full resolution.

Anomaly scorers (``S_c(x) = sum_q softmax(class_q)[c] * sigmoid(m_q(x))`` over the C known classes, the
softmax taken over all C+1 columns; higher = more anomalous) are registered in ``scorers.py`` with their formulas
(``mask2anomaly``: ``1 - max_c S_c(x)``, the paper's and the official code's score; ``rba``, ``eam``, ``msp``,
``max_logit``, ``energy``).

Refinement (every scorer): queries with ``max softmax(class_q) > refine_score_threshold`` (no-object column
included) whose argmax is in ``refine_class_ids`` are kept; if at least ``refine_min_queries`` (official: 2,
i.e. "more than one") are kept, ``R(x) = max_kept score_q * sigmoid(m_q(x))`` and ``a(x) = refined_score`` where
``R(x) >= 0.5``: the official ``a(x) *= (R(x) < 0.5)`` for the bounded scorers (refined_score 0), the low end of
the colour scale for rba, max_logit and energy, for which 0 is the most anomalous value or mid-scale (scorers.py).

The processor never runs a model: batching, flip TTA and the forward pass are in ``inference.py``.

This file travels to the Hub as remote code: it imports only the standard library, numpy, PIL, torch,
transformers and its sibling files.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.mask2former.image_processing_pil_mask2former import (
    Mask2FormerImageProcessorKwargs,
    Mask2FormerImageProcessorPil,
)
from transformers.utils import TensorType, logging

from .configuration_mask2anomaly import CITYSCAPES_REFINE_CLASS_IDS, OUTLIER_LABEL, legacy_processor_settings
from .scorers import ANOMALY_SCORERS, DEFAULT_SCORER, SCORERS, get_scorer

logger = logging.get_logger(__name__)

# Extra memory one post-processing block may use: with 100 queries at 1024 x 2048 that is blocks of ~64 rows, a
# tenth of what upsampling all masks at once takes, in few enough blocks that per-operation overhead stays small.
DEFAULT_MEMORY_BUDGET_MB: float = 128.0
# Mask2Former predicts masks at stride 4 of the padded input.
MASK_STRIDE: int = 4

ImageLike = Any  # PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike


class Mask2AnomalyImageProcessorKwargs(Mask2FormerImageProcessorKwargs, total=False):
    r"""
    outlier_label (`int`, *optional*, defaults to 254):
        Value marking outlier pixels in segmentation maps: returned as `outlier_labels`, never a class mask.
    refine (`bool`, *optional*, defaults to `True`):
        Apply mask refinement in the anomaly post-processing.
    refine_score_threshold (`float`, *optional*, defaults to 0.95):
        Minimum (exclusive) max class probability of a query taking part in refinement.
    refine_class_ids (`list[int]`, *optional*, defaults to Cityscapes train ids 2..10):
        Classes whose confident masks zero the anomaly score.
    refine_min_queries (`int`, *optional*, defaults to 2):
        Refinement applies only when at least this many queries are kept (official: more than one).
    anomaly_scorer (`str`, *optional*, defaults to `"mask2anomaly"`):
        Per-pixel anomaly score, one of `ANOMALY_SCORERS`.
    anomaly_threshold (`float`, *optional*, defaults to the scorer's `default_threshold`):
        Decision threshold on the `anomaly_scorer`'s score when a binary mask is needed (0.5 for the scorers on
        [0, 1]; see `scorers.py` for the others).
    flip_tta (`bool`, *optional*, defaults to `True`):
        Horizontal-flip test-time augmentation (run by `inference.predict_anomaly` and the pipelines).
    """

    outlier_label: int
    refine: bool
    refine_score_threshold: float | int
    refine_class_ids: list[int] | tuple[int, ...]
    refine_min_queries: int
    anomaly_scorer: str
    anomaly_threshold: float | int
    flip_tta: bool


# --------------------------------------------------------------------------------------------------------
# Image loading and conversion to RGB uint8
# --------------------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    """A short description of an input value for error messages."""
    if isinstance(value, Image.Image):
        return f"PIL image of mode {value.mode!r} and size {value.size}"
    if isinstance(value, np.ndarray):
        return f"numpy array of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, torch.Tensor):
        return f"torch tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"


_IMAGE_EXPECTED = (
    "a PIL image, a numpy array or torch tensor of shape (H, W), (H, W, 1|3|4) or (1|3|4, H, W), "
    "or the path of an image file"
)


def _to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Bring an array of any numeric dtype to uint8 0..255 (16-bit scaled, floats in [0, 1] or [0, 255])."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        # 65535 -> 255 exactly; the usual 16-bit -> 8-bit mapping
        return np.round(array.astype(np.float32) / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(f"{what}: integer values must lie in 0..255 or 0..65535, got range "
                             f"[{array.min()}, {array.max()}]")
        if array.size and array.max() > 255:
            return np.round(array.astype(np.float32) / 257.0).astype(np.uint8)
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"{what}: contains NaN or infinite values")
        # transformers' convention: float images are already in [0, 1]; otherwise take them as 0..255
        if array.size and array.min() >= 0.0 and array.max() <= 1.0:
            array = array * 255.0
        return np.clip(np.round(array), 0, 255).astype(np.uint8)
    raise ValueError(f"{what}: expected a numeric array, got dtype {array.dtype}")


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to RGB, scaling 16/32-bit and float modes to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        # PIL's own convert("RGB") clips these modes at 255 instead of scaling them
        gray = _to_uint8(np.asarray(image), f"PIL image of mode {image.mode!r}")
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
    # L, LA, P, PA, RGBA, CMYK, YCbCr, ...: PIL's conversion is what detectron2's read_image uses (alpha dropped)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """
    Convert one image to an (H, W, 3) uint8 RGB array.

    PIL images: EXIF orientation applied, any mode converted (16-bit scaled to 8-bit, alpha dropped as
    detectron2's reader does). Arrays/tensors: (H, W), (H, W, 1|3|4) or channel-first (1|3|4, H, W); uint8 as is,
    16-bit divided by 257, floats in [0, 1] multiplied by 255 (other floats taken as 0..255), alpha dropped.
    Strings and paths are read with `load_image`.
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        image = _pil_to_rgb(ImageOps.exif_transpose(image))
        array = np.asarray(image)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        what = _describe(image)
        if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"Expected {_IMAGE_EXPECTED}; got {what}")
        array = _to_uint8(array, what)
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        array = array[..., :3]
    else:
        raise ValueError(f"Expected {_IMAGE_EXPECTED}; got {_describe(image)}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"Expected an image with at least one pixel; got {_describe(image)}")
    return np.ascontiguousarray(array)


# The file extensions (lower case, with the dot) that folders of images are searched for, by the predict CLI, the
# evaluation readers and the training data builders alike; a file named explicitly is read whatever its name.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def load_image(path: str | os.PathLike) -> Image.Image:
    """
    Read an image file as an RGB PIL image with its EXIF orientation applied (as detectron2's ``read_image``).

    Raises:
        ValueError: naming the file and the reason when it is missing, empty, truncated, not an image, or larger
            than PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`; PIL refuses images of more than
            twice the limit and warns above it, and the warning is refused too where warnings are errors).
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ValueError(f"Cannot read image {name!r}: no such file")
    if os.path.getsize(name) == 0:
        raise ValueError(f"Cannot read image {name!r}: the file is empty")
    try:
        with Image.open(name) as opened:
            opened.load()  # decode now so that truncated data fails here, with the file's name
            oriented = ImageOps.exif_transpose(opened)
            return _pil_to_rgb(oriented).copy()
    except UnidentifiedImageError as err:
        raise ValueError(f"Cannot read image {name!r}: not an image format PIL can decode") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(_pixel_limit_message(name, err)) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Cannot read image {name!r}: truncated or corrupt image data ({err})") from err


def _pixel_limit_message(name: str, err: Exception) -> str:
    """Why PIL refused `name` as a possible decompression bomb, and how to read it anyway."""
    # PIL raises before the image object exists; its message is the only place that holds the pixel count
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(found.group(1)):,} pixels" if found else "more pixels than allowed"
    limit = Image.MAX_IMAGE_PIXELS
    refused = "twice " if isinstance(err, Image.DecompressionBombError) else ""
    return (f"Cannot read image {name!r}: it has {size}, more than {refused}PIL's limit PIL.Image.MAX_IMAGE_PIXELS "
            f"= {limit:,} (a guard against decompression bombs). If the file is trusted, raise the limit before "
            f"reading it: `PIL.Image.MAX_IMAGE_PIXELS = {found.group(1) if found else '<pixels>'}` (None turns the "
            f"check off)")


def _to_label_map(segmentation_map: Any) -> np.ndarray:
    """Convert one segmentation map (PIL, numpy or torch; (H, W) or (1, H, W)) to an (H, W) int64 array."""
    what = _describe(segmentation_map)
    if isinstance(segmentation_map, Image.Image):
        if segmentation_map.mode not in ("L", "P", "I", "I;16", "I;16L", "I;16B", "1"):
            raise ValueError(f"Expected a single-channel label map (PIL mode L, P, I or I;16); got {what}")
        array = np.asarray(segmentation_map)
    elif isinstance(segmentation_map, torch.Tensor):
        array = segmentation_map.detach().cpu().numpy()
    elif isinstance(segmentation_map, np.ndarray):
        array = segmentation_map
    else:
        raise ValueError(f"Expected a segmentation map as a PIL image, numpy array or torch tensor; got {what}")
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
    if array.ndim != 2:
        raise ValueError(f"Expected a segmentation map of shape (H, W) or (1, H, W); got {what}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.mod(array, 1) == 0):
            raise ValueError(f"Expected integer labels in the segmentation map; got non-integer values in {what}")
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ValueError(f"Expected integer labels in the segmentation map; got {what}")
    return array.astype(np.int64)


def _flatten_batch(inputs: Any, single_ndim: int) -> list[Any]:
    """A single input or a batch (list/tuple, or an array/tensor with one more dimension) as a list."""
    if isinstance(inputs, (list, tuple)):
        if len(inputs) == 0:
            raise ValueError("Expected at least one image; got an empty list")
        return list(inputs)
    if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == single_ndim + 1:
        return list(inputs)
    return [inputs]


# --------------------------------------------------------------------------------------------------------
# Resizing rule
# --------------------------------------------------------------------------------------------------------


def get_resize_output_size(
    height: int, width: int, shortest_edge: int, longest_edge: int | None = None
) -> tuple[int, int]:
    """
    Output (height, width) of detectron2's ``ResizeShortestEdge`` (same float arithmetic and rounding).

    scale = shortest_edge / min(h, w); if the longer side then exceeds `longest_edge`, both sides are scaled
    down so that it equals `longest_edge`; each side is rounded with ``int(x + 0.5)``. (transformers'
    `get_size_with_aspect_ratio` truncates instead and can be one pixel off.)
    """
    if height < 1 or width < 1:
        raise ValueError(f"Expected a positive image size; got (height, width) = ({height}, {width})")
    size = float(shortest_edge)
    scale = size / min(height, width)
    if height < width:
        new_height, new_width = size, scale * width
    else:
        new_height, new_width = scale * height, size
    if longest_edge and max(new_height, new_width) > longest_edge:
        scale = longest_edge * 1.0 / max(new_height, new_width)
        new_height = new_height * scale
        new_width = new_width * scale
    return int(new_height + 0.5), int(new_width + 0.5)


# --------------------------------------------------------------------------------------------------------
# Bounded-memory rendering of mask-level channels
# --------------------------------------------------------------------------------------------------------


@dataclass
class _LinearTaps:
    """1-D linear interpolation (align_corners=False) from `in_size` to `out_size`: out[i] = w_lo*x[lo] + w_hi*x[hi]."""

    lo: torch.Tensor  # (out_size,) long
    hi: torch.Tensor  # (out_size,) long
    w_lo: torch.Tensor  # (out_size,) float32
    w_hi: torch.Tensor  # (out_size,) float32

    @classmethod
    def build(cls, in_size: int, out_size: int, device: torch.device) -> _LinearTaps:
        # Same float32 arithmetic as PyTorch's upsample_bilinear2d: src = scale * (dst + 0.5) - 0.5, clamped at 0
        scale = torch.tensor(in_size / out_size, dtype=torch.float32)
        src = (scale * (torch.arange(out_size, dtype=torch.float32) + 0.5) - 0.5).clamp_(min=0.0)
        lo = src.long().clamp_(max=in_size - 1)
        hi = torch.where(lo < in_size - 1, lo + 1, lo)
        w_hi = (src - lo.float()).clamp_(0.0, 1.0)
        return cls(lo.to(device), hi.to(device), (1.0 - w_hi).to(device), w_hi.to(device))


def _lerp_rows(x: torch.Tensor, taps: _LinearTaps, rows: slice, offset: int) -> torch.Tensor:
    """Interpolate along dim 1 of `x` (N, h, w) for output rows `rows`; `offset` = first row of x in the input."""
    lo = taps.lo[rows] - offset
    hi = taps.hi[rows] - offset
    out = x.index_select(1, lo).mul_(taps.w_lo[rows].view(1, -1, 1))
    return out.add_(x.index_select(1, hi).mul_(taps.w_hi[rows].view(1, -1, 1)))


def _lerp_columns(x: torch.Tensor, out_width: int) -> torch.Tensor:
    """Interpolate along the last dim of `x` (N, h, w) to `out_width` (align_corners=False)."""
    if x.shape[-1] == out_width:
        return x
    return F.interpolate(x, size=out_width, mode="linear", align_corners=False)


def _resized(channels: torch.Tensor, taps: _LinearTaps | None, rows: slice, offset: int, out_w: int) -> torch.Tensor:
    """Crop-resized rows of (K, n, w) channels: vertical taps for output `rows`, then linear along the width."""
    if taps is None:
        return channels
    return _lerp_columns(_lerp_rows(channels, taps, rows, offset).contiguous(), out_w)


def _render_channels(
    mask_logits: torch.Tensor,
    sigmoid_weights: torch.Tensor,
    refine_queries: torch.Tensor | None,
    refine_scores: torch.Tensor | None,
    logit_weights: torch.Tensor | None,
    valid_size: tuple[int, int],
    output_size: tuple[int, int],
    memory_budget_mb: float,
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """
    Yield blocks of output rows of the channels ``resize(crop(c(up(m))))`` of one image.

    `up` upsamples the mask logits bilinearly (align_corners=False) to the padded size, `crop` keeps the top-left
    `valid_size`, `resize` is bilinear (align_corners=False) to `output_size`. Channels: W^T sigmoid(up(m)) (e.g.
    the class scores S_c), score_q * sigmoid(up(m_q)) for the refinement queries, V^T up(m) (logit channels).

    Args:
        mask_logits: (Q, h, w) mask logits, at stride 4 of the padded size (4h, 4w).
        sigmoid_weights: (Q, Ks) weights W.
        refine_queries, refine_scores: (Kr,) indices and scores of the refinement queries, or None.
        logit_weights: (Q, Kl) weights V, or None.
        valid_size: (hv, wv) un-padded part of the padded grid.
        output_size: (H, W).
        memory_budget_mb: extra memory one block may use; sets the number of rows per block.

    Yields:
        (y0, y1, sigmoid channels (Ks, n, W), refinement channels (Kr, n, W) or None, logit channels (Kl, n, W) or
        None) for output rows y0..y1 (n = y1 - y0).
    """
    num_queries, mask_h, mask_w = mask_logits.shape
    padded_h, padded_w = MASK_STRIDE * mask_h, MASK_STRIDE * mask_w
    valid_h, valid_w = valid_size
    out_h, out_w = output_size
    if not (0 < valid_h <= padded_h and 0 < valid_w <= padded_w):
        raise ValueError(
            f"The un-padded image size {tuple(valid_size)} must lie within the padded size ({padded_h}, {padded_w}) "
            f"given by the mask logits of size ({mask_h}, {mask_w}) at stride {MASK_STRIDE}"
        )
    channels = sigmoid_weights.shape[1]
    channels += 0 if refine_queries is None else refine_queries.numel()
    channels += 0 if logit_weights is None else logit_weights.shape[1]
    resize = (valid_h, valid_w) != (out_h, out_w)
    out_rows = _LinearTaps.build(valid_h, out_h, mask_logits.device) if resize else None

    # float32 bytes per row of the padded grid: upsampled logits (sigmoid in place) + channels before/after resize
    per_row = 4 * (num_queries * padded_w + 3 * channels * padded_w)
    rows_per_out_row = valid_h / out_h
    halo = 2 * MASK_STRIDE * per_row  # one extra mask row above and below each block
    block = int((memory_budget_mb * 2**20 - halo) // (rows_per_out_row * per_row + 4 * 2 * channels * out_w))
    block = max(1, min(out_h, block))
    logger.debug(f"rendering {channels} channels of {out_h}x{out_w} in blocks of {block} rows")

    for y0 in range(0, out_h, block):
        y1 = min(out_h, y0 + block)
        # rows r0..r1 of the cropped padded grid that these output rows read
        r0, r1 = (int(out_rows.lo[y0]), int(out_rows.hi[y1 - 1]) + 1) if resize else (y0, y1)
        # Mask rows a..b with one row of margin: the stride is exactly 4, so upsampling them alone gives the same
        # rows r0..r1, bit for bit, as upsampling the whole mask (same source positions and weights).
        a = max(0, r0 // MASK_STRIDE - 1)
        b = min(mask_h, (r1 - 1) // MASK_STRIDE + 2)
        logits = F.interpolate(
            mask_logits[None, :, a:b], size=(MASK_STRIDE * (b - a), padded_w), mode="bilinear", align_corners=False
        )[0]
        rows = slice(r0 - MASK_STRIDE * a, r1 - MASK_STRIDE * a)
        n_up = logits.shape[1]
        logit_channels = None
        if logit_weights is not None:
            flat = logit_weights.t() @ logits.reshape(num_queries, -1)
            logit_channels = flat.view(-1, n_up, padded_w)[:, rows, :valid_w]
        probs = logits.sigmoid_()
        sig_channels = (sigmoid_weights.t() @ probs.reshape(num_queries, -1)).view(-1, n_up, padded_w)
        sig_channels = sig_channels[:, rows, :valid_w]
        refine_channels = None
        if refine_queries is not None:
            refine_channels = probs[refine_queries][:, rows, :valid_w] * refine_scores.view(-1, 1, 1)
        out = [None if c is None else _resized(c, out_rows, slice(y0, y1), r0, out_w)
               for c in (sig_channels, refine_channels, logit_channels)]
        yield y0, y1, out[0], out[1], out[2]


@dataclass
class AnomalySemanticOutput:
    """Post-processed maps of one image, at its target size, from one rendering pass."""

    anomaly_map: torch.Tensor  # (height, width) float32, higher = more anomalous (flip-averaged with flipped outputs)
    semantic_map: torch.Tensor  # (height, width) int64 class ids, argmax_c S_c(x) of the un-flipped view
    class_confidence: torch.Tensor  # (height, width) float32, max_c S_c(x): the winning class's score


# --------------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------------


class Mask2AnomalyImageProcessor(Mask2FormerImageProcessorPil):
    r"""
    Image processor of Mask2Anomaly (PIL backend; no torchvision needed).

    Defaults are the official test-time pre-processing of the released Cityscapes models: RGB, shortest side 1024
    and longest 2048 resized as detectron2's `ResizeShortestEdge` (PIL bilinear on uint8), ImageNet mean/std
    (the official 0-255 values [123.675, 116.28, 103.53] / [58.395, 57.12, 57.375] as rescale 1/255 + normalise),
    zero padding at the bottom/right to a multiple of `size_divisor` (32) after normalising. `do_resize=False`
    keeps the native size (still padded).

    With `segmentation_maps`, also returns `mask_labels`, `class_labels` and `outlier_labels` (B, Hp, Wp): 1 where
    the resized, padded map holds `outlier_label` (254), 0 elsewhere. Neither 254 nor `ignore_index` (255, also
    the padding value of maps) becomes a class mask.

    The processor owns the post-processing settings `refine`, `refine_score_threshold`, `refine_class_ids`,
    `refine_min_queries`, `anomaly_scorer`, `anomaly_threshold`, `flip_tta` (defaults of the `post_process_*`
    arguments of the same names) and the data encoding `outlier_label`; they are saved in preprocessor_config.json
    only. The scorers are registered in ``scorers.py``.
    """

    valid_kwargs = Mask2AnomalyImageProcessorKwargs
    size = {"shortest_edge": 1024, "longest_edge": 2048}
    resample = PILImageResampling.BILINEAR
    size_divisor = 32
    ignore_index = 255
    outlier_label = OUTLIER_LABEL
    refine = True
    refine_score_threshold = 0.95
    refine_class_ids = list(CITYSCAPES_REFINE_CLASS_IDS)
    refine_min_queries = 2
    anomaly_scorer = DEFAULT_SCORER
    anomaly_threshold = SCORERS[DEFAULT_SCORER].default_threshold
    flip_tta = True
    model_input_names = ["pixel_values", "pixel_mask"]

    def __init__(self, **kwargs) -> None:
        if "max_size" not in kwargs and kwargs.get("size") is None:
            kwargs["max_size"] = self.size["longest_edge"]
        super().__init__(**kwargs)
        self._check_setting_types()
        self.refine_class_ids = [int(i) for i in self.refine_class_ids]
        self._check_postprocess_settings(self.anomaly_scorer, self.refine_min_queries)
        if kwargs.get("anomaly_threshold") is None:
            # no threshold given: the scorer's own (0.5 suits only the scorers on [0, 1])
            self.anomaly_threshold = get_scorer(self.anomaly_scorer).default_threshold

    def decision_threshold(self, scorer: str | None = None) -> float:
        """The anomaly decision threshold for `scorer` (default: `anomaly_scorer`): `anomaly_threshold` for the
        processor's own scorer, the registry's `default_threshold` for another one (whose scores live on another
        scale)."""
        if scorer is None or scorer == self.anomaly_scorer:
            return float(self.anomaly_threshold)
        return float(get_scorer(scorer, "scorer").default_threshold)

    # settings (as saved in preprocessor_config.json) and the JSON type each must have: a string such as "false" or
    # "high" would otherwise load and misbehave (a non-empty string is true)
    _BOOLEAN_SETTINGS = ("refine", "flip_tta", "do_resize", "do_rescale", "do_normalize", "do_pad")
    _NUMBER_SETTINGS = ("refine_score_threshold", "anomaly_threshold", "rescale_factor")
    _INTEGER_SETTINGS = ("outlier_label", "ignore_index", "refine_min_queries", "size_divisor")

    def _check_setting_types(self) -> None:
        def refuse(key: str, value: Any, expected: str) -> None:
            raise ValueError(f"{type(self).__name__}: {key}={value!r} ({type(value).__name__}); expected {expected}")

        def number(value: Any) -> bool:
            return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

        for key in self._BOOLEAN_SETTINGS:
            value = getattr(self, key, None)
            if value is not None and not isinstance(value, bool):
                refuse(key, value, "true or false")
        for key in self._NUMBER_SETTINGS:
            value = getattr(self, key, None)
            if value is not None and not number(value):
                refuse(key, value, "a finite number")
        for key in self._INTEGER_SETTINGS:
            value = getattr(self, key, None)
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
                refuse(key, value, "a whole number")
        for key in ("image_mean", "image_std"):
            value = getattr(self, key, None)
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(number(v) for v in values):
                refuse(key, value, "finite numbers (one per channel)")
        std = self.image_std if isinstance(self.image_std, (list, tuple)) else [self.image_std]
        if self.do_normalize and any(v <= 0 for v in std if v is not None):
            refuse("image_std", self.image_std, "positive values (normalising divides by them)")

    @staticmethod
    def _check_postprocess_settings(scorer: str, refine_min_queries: int) -> None:
        get_scorer(scorer)
        if int(refine_min_queries) < 1:
            raise ValueError(f"refine_min_queries={refine_min_queries!r} must be at least 1")

    @classmethod
    def from_model_config(cls, config: Any, **kwargs) -> Mask2AnomalyImageProcessor:
        """
        A processor for a model config: `ignore_value` as `ignore_index`, and the post-processing settings and
        `outlier_label` that an older config.json still carried (`config.legacy_postprocessing`, see
        `Mask2AnomalyConfig`); `kwargs` override them and set the rest.
        """
        settings = dict(legacy_processor_settings(config))
        if getattr(config, "ignore_value", None) is not None:
            settings["ignore_index"] = int(config.ignore_value)
        settings.update(kwargs)
        return cls(**settings)

    # ---------------------------------------------------------------------------------------------- inputs

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Read local image paths with `load_image`; URLs are refused (this processor never uses the network)."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike)):
            name = os.fspath(image_url_or_urls)
            if name.startswith(("http://", "https://")):
                raise ValueError(f"Expected a local image path; got the URL {name!r} (download it first)")
            return load_image(name)
        return image_url_or_urls

    def resize(
        self,
        image: np.ndarray,
        size: SizeDict,
        resample: PILImageResampling | int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """
        Resize an (H, W, 3) uint8 image with PIL (bilinear by default) to the size given by `size`.

        `size` is either `shortest_edge` (+ optional `longest_edge`), resized with detectron2's rule
        (`get_resize_output_size`), or a fixed `height` and `width`.
        """
        new_size = self.get_resized_size(image.shape[:2], size)
        if new_size == tuple(image.shape[:2]):
            return image
        resample = PILImageResampling.BILINEAR if resample is None else resample
        resized = Image.fromarray(image).resize((new_size[1], new_size[0]), resample=int(resample))
        return np.asarray(resized)

    def get_resized_size(self, image_size: tuple[int, int], size: SizeDict | dict | None = None) -> tuple[int, int]:
        """(height, width) an image of `image_size` gets from `resize` with `size` (default `self.size`)."""
        size = self.size if size is None else size
        if not isinstance(size, SizeDict):
            size = SizeDict(**size)
        height, width = int(image_size[0]), int(image_size[1])
        if size.shortest_edge:
            return get_resize_output_size(height, width, size.shortest_edge, size.longest_edge)
        if size.height and size.width:
            return int(size.height), int(size.width)
        raise ValueError(f"size must hold 'shortest_edge' (and optionally 'longest_edge') or 'height' and "
                         f"'width'; got {dict(size)}")

    def processed_size(self, original_size: tuple[int, int], do_resize: bool | None = None) -> tuple[int, int]:
        """The un-padded (height, width) the model sees for an original image of `original_size`."""
        do_resize = self.do_resize if do_resize is None else do_resize
        return self.get_resized_size(original_size) if do_resize else (int(original_size[0]), int(original_size[1]))

    def _preprocess_image_like_inputs(
        self,
        images: Any,
        segmentation_maps: Any,
        instance_id_to_semantic_id: list[dict[int, int]] | dict[int, int] | None,
        do_convert_rgb: bool | None = None,
        input_data_format: Any = None,
        **kwargs,
    ) -> BatchFeature:
        image_list = [to_rgb_uint8(image) for image in _flatten_batch(self.fetch_images(images), 3)]
        map_list = None
        if segmentation_maps is not None:
            map_list = [_to_label_map(m) for m in _flatten_batch(segmentation_maps, 2)]
            if len(map_list) != len(image_list):
                raise ValueError(f"Got {len(image_list)} images but {len(map_list)} segmentation maps")
            for idx, (image, label_map) in enumerate(zip(image_list, map_list)):
                if image.shape[:2] != label_map.shape:
                    raise ValueError(f"Segmentation map {idx} has size {label_map.shape}, expected the size of its "
                                     f"image {image.shape[:2]}")
        return self._preprocess(image_list, map_list, instance_id_to_semantic_id, **kwargs)

    def _label_map_to_targets(
        self,
        label_map: np.ndarray,
        instance_id_to_semantic_id: dict[int, int] | None,
        ignore_index: int | None,
        do_reduce_labels: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(H, W) labels -> binary masks (K, H, W) float32, class ids (K,) int64, outlier map (H, W) int64."""
        outlier = label_map == self.outlier_label
        void = np.zeros_like(outlier) if ignore_index is None else label_map == ignore_index
        labels = label_map
        if do_reduce_labels:
            # 0 becomes void and the rest shift down; decided on the raw values so 254/255 keep their meaning
            void = void | (label_map == 0)
            labels = label_map - 1
        valid = ~(outlier | void)
        ids = np.unique(labels[valid])
        masks = (labels[None] == ids[:, None, None]) & valid[None]
        if instance_id_to_semantic_id is not None:
            offset = 1 if do_reduce_labels else 0
            try:
                classes = [instance_id_to_semantic_id[int(i) + offset] - offset for i in ids]
            except KeyError as err:
                raise ValueError(f"instance id {err.args[0]} of the segmentation map is missing from "
                                 f"instance_id_to_semantic_id") from err
            ids = np.asarray(classes, dtype=np.int64)
        return masks.astype(np.float32), ids.astype(np.int64), outlier.astype(np.int64)

    def _preprocess(
        self,
        images: list[np.ndarray],
        segmentation_maps: list[np.ndarray] | None,
        instance_id_to_semantic_id: list[dict[int, int]] | dict[int, int] | None,
        do_resize: bool | None = None,
        size: SizeDict | None = None,
        pad_size: SizeDict | None = None,
        size_divisor: int | None = None,
        resample: PILImageResampling | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        ignore_index: int | None = None,
        do_reduce_labels: bool | None = None,
        return_tensors: str | TensorType | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Resize (H, W, 3) uint8 images (and label maps, nearest), normalise, pad to a multiple of `size_divisor`.

        Returns a `BatchFeature` with `pixel_values` (B, 3, Hp, Wp) float32, `pixel_mask` (B, Hp, Wp) and, with maps,
        `mask_labels` (list of (K_i, Hp, Wp)), `class_labels` (list of (K_i,)) and `outlier_labels` (B, Hp, Wp).
        """
        resized = []
        for image in images:
            resized.append(self.resize(image, size, resample) if do_resize else image)
        sizes = [image.shape[:2] for image in resized]
        if pad_size is not None:
            padded_h, padded_w = int(pad_size.height), int(pad_size.width)
        else:
            padded_h, padded_w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        if size_divisor:
            padded_h = int(math.ceil(padded_h / size_divisor) * size_divisor)
            padded_w = int(math.ceil(padded_w / size_divisor) * size_divisor)
        for h, w in sizes:
            if h > padded_h or w > padded_w:
                raise ValueError(f"pad_size ({padded_h}, {padded_w}) is smaller than a resized image ({h}, {w})")

        # Official arithmetic: (x - 255 * mean) / (255 * std) in float32 on the 0..255 values, which is what
        # rescale(1/255) + normalise means but without the extra rounding of a separate rescale step.
        scale = float(rescale_factor) if do_rescale else 1.0
        mean = np.zeros(3) if not do_normalize else np.broadcast_to(np.asarray(image_mean, np.float64), (3,))
        std = np.ones(3) if not do_normalize else np.broadcast_to(np.asarray(image_std, np.float64), (3,))
        mean = (mean / scale).astype(np.float32).reshape(3, 1, 1)
        std = (std / scale).astype(np.float32).reshape(3, 1, 1)
        pixel_values = np.zeros((len(resized), 3, padded_h, padded_w), dtype=np.float32)
        pixel_mask = np.zeros((len(resized), padded_h, padded_w), dtype=np.int64)
        for idx, image in enumerate(resized):
            h, w = image.shape[:2]
            chw = image.transpose(2, 0, 1).astype(np.float32)
            if do_normalize:
                chw = (chw - mean) / std
            elif do_rescale:
                chw = chw * np.float32(scale)
            pixel_values[idx, :, :h, :w] = chw
            pixel_mask[idx, :h, :w] = 1

        data = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        targets = None
        if segmentation_maps is not None:
            map_fill = 255 if ignore_index is None else int(ignore_index)
            targets = []
            outliers = np.zeros((len(resized), padded_h, padded_w), dtype=np.int64)
            for idx, label_map in enumerate(segmentation_maps):
                h, w = sizes[idx]
                if label_map.shape != (h, w):
                    # PIL nearest on 32-bit integers, as detectron2 resizes label maps
                    label_map = np.asarray(
                        Image.fromarray(label_map.astype(np.int32)).resize((w, h), resample=Image.NEAREST)
                    ).astype(np.int64)
                padded = np.full((padded_h, padded_w), map_fill, dtype=np.int64)
                padded[:h, :w] = label_map
                mapping = (instance_id_to_semantic_id[idx] if isinstance(instance_id_to_semantic_id, list)
                           else instance_id_to_semantic_id)
                masks, classes, outlier = self._label_map_to_targets(
                    padded, mapping, map_fill, bool(do_reduce_labels)
                )
                targets.append((masks, classes))
                outliers[idx] = outlier
            data["outlier_labels"] = outliers

        encoded = BatchFeature(data=data, tensor_type=return_tensors)
        if targets is not None:
            as_tensor = return_tensors in ("pt", TensorType.PYTORCH)
            encoded["mask_labels"] = [torch.from_numpy(m) if as_tensor else m for m, _ in targets]
            encoded["class_labels"] = [torch.from_numpy(c) if as_tensor else c for _, c in targets]
        return encoded

    # ---------------------------------------------------------------------------------------------- outputs

    def _resolve_sizes(
        self,
        batch_size: int,
        mask_size: tuple[int, int],
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None,
        image_sizes: Sequence[tuple[int, int]] | torch.Tensor | None,
    ) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Per image: (un-padded size on the padded grid, output size)."""
        padded = (MASK_STRIDE * mask_size[0], MASK_STRIDE * mask_size[1])

        def as_pairs(sizes: Any, name: str) -> list[tuple[int, int]] | None:
            if sizes is None:
                return None
            pairs = [tuple(int(v) for v in s) for s in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes)]
            if len(pairs) != batch_size or any(len(p) != 2 or min(p) < 1 for p in pairs):
                raise ValueError(f"{name} must hold one positive (height, width) per image of the batch of "
                                 f"{batch_size}; got {sizes!r}")
            return pairs

        targets = as_pairs(target_sizes, "target_sizes")
        valids = as_pairs(image_sizes, "image_sizes")
        result = []
        for idx in range(batch_size):
            if valids is not None:
                valid = valids[idx]
            elif targets is not None:
                valid = self.processed_size(targets[idx])
            else:
                valid = padded
            if valid[0] > padded[0] or valid[1] > padded[1]:
                raise ValueError(
                    f"Image {idx}: its processed size {valid} exceeds the padded input size {padded} of the outputs; "
                    f"pass the original sizes as target_sizes (with the processor's resize settings) or the "
                    f"un-padded resized sizes as image_sizes"
                )
            result.append((valid, targets[idx] if targets is not None else valid))
        return result

    def _refinement_queries(
        self, probs: torch.Tensor, refine: bool, refine_min_queries: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Indices (K,) and scores (K,) of the queries kept for refinement from probs (Q, C+1), or None."""
        if not refine:
            return None
        num_classes = probs.shape[1] - 1
        bad = [i for i in self.refine_class_ids if not 0 <= i < num_classes]
        if bad:
            raise ValueError(f"refine_class_ids {bad} are outside the {num_classes} classes of the model outputs")
        scores, labels = probs.max(dim=1)  # over all C+1 columns, no-object included, as officially
        class_ids = torch.tensor(self.refine_class_ids, dtype=labels.dtype, device=labels.device)
        kept = ((scores > self.refine_score_threshold) & torch.isin(labels, class_ids)).nonzero().flatten()
        if kept.numel() < refine_min_queries:
            return None
        return kept, scores[kept]

    def _dense_maps(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None,
        image_sizes: Sequence[tuple[int, int]] | torch.Tensor | None,
        scorer: str | None,
        refine: bool | None,
        refine_min_queries: int | None,
        want_anomaly: bool,
        want_semantic: bool,
        memory_budget_mb: float | None,
        want_class_scores: bool = False,
        want_confidence: bool = False,
    ) -> list[dict[str, torch.Tensor]]:
        """Anomaly (float32), semantic (int64) maps, class channels S (C, H, W) and the class confidence
        max_c S_c (float32) per image, from one rendering pass; the maps not asked for are None."""
        scorer = self.anomaly_scorer if scorer is None else scorer
        refine = self.refine if refine is None else refine
        refine_min_queries = self.refine_min_queries if refine_min_queries is None else refine_min_queries
        self._check_postprocess_settings(scorer, refine_min_queries)
        score_with = SCORERS[scorer]
        budget = DEFAULT_MEMORY_BUDGET_MB if memory_budget_mb is None else float(memory_budget_mb)
        class_logits = outputs.class_queries_logits
        mask_logits = outputs.masks_queries_logits
        if class_logits.ndim != 3 or mask_logits.ndim != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
            raise ValueError(
                f"Expected class_queries_logits (B, Q, C+1) and masks_queries_logits (B, Q, h, w) with the same B and "
                f"Q; got {tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
            )
        batch_size = class_logits.shape[0]
        sizes = self._resolve_sizes(batch_size, tuple(mask_logits.shape[-2:]), target_sizes, image_sizes)

        results = []
        with torch.no_grad():
            for idx in range(batch_size):
                valid, out_size = sizes[idx]
                probs = class_logits[idx].float().softmax(dim=-1)  # (Q, C+1), no-object column included
                known = probs[:, :-1]
                num_classes = known.shape[1]
                sigmoid_weights = known
                # the scorer's extra channels (see scorers.py): the EAM sum rides along with the class channels
                if want_anomaly and score_with.needs_eam:
                    sigmoid_weights = torch.cat([known, known.max(dim=1, keepdim=True).values], dim=1)
                refinement = self._refinement_queries(probs, refine, refine_min_queries) if want_anomaly else None
                logit_weights = known if want_anomaly and score_with.needs_logits else None

                device = mask_logits.device
                anomaly = torch.empty(out_size, dtype=torch.float32, device=device) if want_anomaly else None
                semantic = torch.empty(out_size, dtype=torch.long, device=device) if want_semantic else None
                confidence = torch.empty(out_size, dtype=torch.float32, device=device) if want_confidence else None
                class_map = (torch.empty((num_classes, *out_size), dtype=torch.float32, device=device)
                             if want_class_scores else None)
                blocks = _render_channels(
                    mask_logits[idx].float(), sigmoid_weights, *(refinement or (None, None)), logit_weights,
                    valid, out_size, budget,
                )
                for y0, y1, sig_channels, refine_channels, logit_channels in blocks:
                    class_scores = sig_channels[:num_classes]
                    if want_semantic:
                        semantic[y0:y1] = class_scores.argmax(dim=0)
                    if want_confidence:
                        confidence[y0:y1] = class_scores.max(dim=0).values
                    if want_class_scores:
                        class_map[:, y0:y1] = class_scores
                    if not want_anomaly:
                        continue
                    eam_sum = sig_channels[num_classes] if score_with.needs_eam else None
                    score = score_with.function(class_scores, eam_sum, logit_channels)
                    if refine_channels is not None:
                        # official: a * (1 - [R >= 0.5]) (refined_score 0); filling in place avoids a bool -> float
                        # conversion
                        score.masked_fill_(refine_channels.max(dim=0).values >= 0.5, score_with.refined_score)
                    anomaly[y0:y1] = score
                results.append({"anomaly_map": anomaly, "semantic_map": semantic, "class_scores": class_map,
                                "class_confidence": confidence})
        return results

    def post_process_anomaly_and_semantic(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        flipped_outputs: Any | None = None,
        refine: bool | None = None,
        scorer: str | None = None,
        image_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        refine_min_queries: int | None = None,
        memory_budget_mb: float | None = None,
    ) -> list[AnomalySemanticOutput]:
        """
        Anomaly map, semantic map and class confidence per image from one rendering pass over the class channels:
        the same values as `post_process_anomaly_segmentation` and `post_process_semantic_segmentation` (and
        max_c S_c, the winning class's score) with the same arguments, for the cost of one of them.

        Args:
            outputs: model outputs with `class_queries_logits` (B, Q, C+1) and `masks_queries_logits` (B, Q, h, w).
            target_sizes: original (height, width) per image (None: the padded size (4h, 4w), nothing cropped).
            flipped_outputs: outputs for the horizontally flipped images; the anomaly map becomes the official
                flip-TTA average `(a + fliplr(a_flip)) / 2` (refinement per view); semantic map and confidence stay
                those of the un-flipped view.
            refine, scorer, refine_min_queries: default to the processor's `refine`, `anomaly_scorer`,
                `refine_min_queries`.
            image_sizes, memory_budget_mb: as in `post_process_anomaly_segmentation`.

        Returns:
            `list[AnomalySemanticOutput]`: per image `anomaly_map` (height, width) float32, `semantic_map` (height,
            width) int64 and `class_confidence` (height, width) float32.
        """
        maps = self._flip_averaged_maps(outputs, flipped_outputs, target_sizes, image_sizes, True, scorer=scorer,
                                        refine=refine, refine_min_queries=refine_min_queries,
                                        memory_budget_mb=memory_budget_mb)
        return [AnomalySemanticOutput(m["anomaly_map"], m["semantic_map"], m["class_confidence"]) for m in maps]

    def _flip_averaged_maps(
        self,
        outputs: Any,
        flipped_outputs: Any | None,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None,
        image_sizes: Sequence[tuple[int, int]] | torch.Tensor | None,
        want_semantic: bool,
        **settings: Any,
    ) -> list[dict[str, torch.Tensor]]:
        """`_dense_maps` of `outputs` (with the semantic map and class confidence if `want_semantic`), the anomaly
        map averaged with that of `flipped_outputs` flipped back (official `(a + fliplr(a_flip)) / 2`)."""
        maps = self._dense_maps(outputs, target_sizes, image_sizes, want_anomaly=True, want_semantic=want_semantic,
                                want_confidence=want_semantic, **settings)
        if flipped_outputs is not None:
            flipped = self._dense_maps(flipped_outputs, target_sizes, image_sizes, want_anomaly=True,
                                       want_semantic=False, **settings)
            for item, other in zip(maps, flipped):
                item["anomaly_map"] = (item["anomaly_map"] + other["anomaly_map"].flip(-1)) / 2
        return maps

    def post_process_anomaly_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        refine: bool | None = None,
        scorer: str | None = None,
        image_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        refine_min_queries: int | None = None,
        flipped_outputs: Any | None = None,
        memory_budget_mb: float | None = None,
    ) -> list[torch.Tensor]:
        """
        Per-pixel anomaly maps from Mask2Anomaly outputs, in the official order of operations.

        Mask logits (B, Q, h, w) are upsampled bilinearly (align_corners=False) to the padded input size
        (4h, 4w), passed through a sigmoid and combined with the class probabilities (B, Q, C+1) into the class
        channels S_c; the channels (and the refinement channels) are cropped to the un-padded resized size,
        resized bilinearly to the target size, and only then scored (see the module docstring for the scorers)
        and refined. Computed in blocks of rows within `memory_budget_mb` of extra memory.

        Args:
            outputs: model outputs with `class_queries_logits` (B, Q, C+1) and `masks_queries_logits` (B, Q, h, w).
            target_sizes: original (height, width) per image; the un-padded resized size is derived from it with
                this processor's resize settings. None: maps at the padded size (4h, 4w), nothing cropped.
            refine: apply mask refinement (default `self.refine`).
            scorer: one of `ANOMALY_SCORERS` (default `self.anomaly_scorer`).
            image_sizes: un-padded resized (height, width) per image, overriding the derived ones.
            refine_min_queries: minimum number of kept queries for refinement (default `self.refine_min_queries`,
                2 = the official "more than one"; 1 refines whenever a query is kept).
            flipped_outputs: outputs for the horizontally flipped images; each map then becomes the official
                flip-TTA average `(a + fliplr(a_flip)) / 2`, refinement applied per view.
            memory_budget_mb: extra memory of one block (default `DEFAULT_MEMORY_BUDGET_MB`, 128 MiB).

        Returns:
            `list[torch.Tensor]`: one float32 (height, width) anomaly map per image (higher = more anomalous).
        """
        maps = self._flip_averaged_maps(outputs, flipped_outputs, target_sizes, image_sizes, False, scorer=scorer,
                                        refine=refine, refine_min_queries=refine_min_queries,
                                        memory_budget_mb=memory_budget_mb)
        return [m["anomaly_map"] for m in maps]

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        return_segmentation_scores: bool = False,
        image_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        memory_budget_mb: float | None = None,
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """
        Semantic maps `argmax_c S_c(x)`, with S_c computed exactly as for the anomaly maps (upsample to the padded
        size, sigmoid, class-weighted sum, crop, resize to the target size), so both agree pixel for pixel.
        (Upstream Mask2Former first resizes masks to 384x384; this does not.) Other arguments as in
        `post_process_anomaly_segmentation`.

        Args:
            return_segmentation_scores: also return the class channels S_c (C, height, width) (the official
                `sem_seg` without refinement channels), as upstream's option of the same name.

        Returns:
            `list[torch.Tensor]`: one int64 (height, width) map of class ids per image; with
            `return_segmentation_scores`, `list[SemanticSegmentationPostProcessorOutput]` with `segmentation` and
            `segmentation_scores`.
        """
        results = self._dense_maps(outputs, target_sizes, image_sizes, scorer=None, refine=False,
                                   refine_min_queries=None, want_anomaly=False, want_semantic=True,
                                   memory_budget_mb=memory_budget_mb, want_class_scores=return_segmentation_scores)
        if not return_segmentation_scores:
            return [r["semantic_map"] for r in results]
        return [
            SemanticSegmentationPostProcessorOutput(
                data={"segmentation": r["semantic_map"], "segmentation_scores": r["class_scores"]}
            )
            for r in results
        ]


__all__ = [
    "ANOMALY_SCORERS",
    "AnomalySemanticOutput",
    "IMAGE_EXTENSIONS",
    "Mask2AnomalyImageProcessor",
    "get_resize_output_size",
    "load_image",
    "to_rgb_uint8",
]
