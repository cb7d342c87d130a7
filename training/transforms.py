"""Training-time augmentation of road scenes, including the outlier pasting of Mask2Anomaly's stage 2.

Order, as in the official mapper: with probability p (0.2) paste the outlier pixels of a random outlier-source
item into the full-resolution image (no rescaling, random position) and label them `outlier_label` (254);
then random resize, random crop (padded with image 0 / label 255 where the image is smaller), photometric
distortion (detectron2's ColorAugSSDTransform: brightness, contrast, saturation, hue) and a horizontal flip.

Each transform is a small class called as ``transform(image, label, rng) -> (image, label)`` with image uint8
(H, W, 3) RGB and label uint8 (H, W). `TrainTransform` runs a chain as a `datasets` transform
(``dataset.with_transform``); the random generator of each sample is derived from (seed, epoch, sample index)
only, so batches are identical whatever the number of DataLoader workers or the order of loading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from modeling_mask2anomaly import OUTLIER_LABEL

IGNORE_LABEL = 255
SAMPLE_INDEX_COLUMN = "sample_index"


class SegmentationTransform(Protocol):
    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]: ...


def to_image_array(image: Any) -> np.ndarray:
    """PIL image or array -> uint8 (H, W, 3) RGB."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an RGB image uint8 (H, W, 3), got {array.dtype} {array.shape}")
    return array


def to_label_array(label: Any) -> np.ndarray:
    """PIL image or array -> uint8 (H, W) label map."""
    if isinstance(label, Image.Image):
        if label.mode not in ("L", "P", "1"):
            label = label.convert("L")
        label = np.asarray(label)
    array = np.asarray(label)
    if array.ndim != 2:
        raise ValueError(f"expected a label map (H, W), got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"label values must fit in uint8, got {array.min()}..{array.max()}")
        array = array.astype(np.uint8)
    return array


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample in one epoch: depends on nothing else (not on workers or order)."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


# ------------------------------------------------------------------------------------------ outlier paste
def paste_outlier(image: np.ndarray, label: np.ndarray, outlier_image: np.ndarray, outlier_mask: np.ndarray,
                  rng: np.random.Generator, outlier_label: int = OUTLIER_LABEL) -> tuple[np.ndarray, np.ndarray]:
    """Paste the masked pixels of `outlier_image` at a random position, labelled `outlier_label`.

    image uint8 (H, W, 3), label uint8 (H, W); outlier_image uint8 (h, w, 3), outlier_mask bool (h, w).
    As in the official code the mask's bounding box is cut out and placed uniformly at random so that it lies
    inside the image, without rescaling; a box larger than the image is first cropped to the image size at a
    random offset. Returns new arrays; the inputs are not modified.
    """
    if outlier_image.shape[:2] != outlier_mask.shape:
        raise ValueError(f"outlier image {outlier_image.shape[:2]} and mask {outlier_mask.shape} differ in size")
    rows, cols = np.flatnonzero(outlier_mask.any(axis=1)), np.flatnonzero(outlier_mask.any(axis=0))
    image, label = image.copy(), label.copy()
    if rows.size == 0:
        return image, label
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    height, width = label.shape
    if bottom - top > height:
        top += int(rng.integers(0, bottom - top - height + 1))
        bottom = top + height
    if right - left > width:
        left += int(rng.integers(0, right - left - width + 1))
        right = left + width
    mask = outlier_mask[top:bottom, left:right]
    pixels = outlier_image[top:bottom, left:right]
    h, w = mask.shape
    y = int(rng.integers(0, height - h + 1))
    x = int(rng.integers(0, width - w + 1))
    image[y : y + h, x : x + w][mask] = pixels[mask]
    label[y : y + h, x : x + w][mask] = outlier_label
    return image, label


class OutlierPaste:
    """With probability `probability`, paste a random item of `source` (see `paste_outlier`).

    `source` is any sequence of mappings with an image column and a mask column (nonzero = outlier), e.g. a
    `datasets.Dataset` from `mask2anomaly_training.data`.
    """

    def __init__(self, source: Sequence[Mapping[str, Any]], probability: float = 0.2,
                 outlier_label: int = OUTLIER_LABEL, image_column: str = "image", mask_column: str = "mask"):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability={probability}: expected a value in [0, 1]")
        if len(source) == 0:
            raise ValueError("the outlier source is empty")
        self.source, self.probability, self.outlier_label = source, probability, outlier_label
        self.image_column, self.mask_column = image_column, mask_column

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        # Draw both numbers always, so that the rest of the chain sees the same stream whether or not we paste.
        draw, pick = rng.random(), int(rng.integers(len(self.source)))
        if draw >= self.probability:
            return image, label
        item = self.source[pick]
        outlier_image = to_image_array(item[self.image_column])
        outlier_mask = to_label_array(item[self.mask_column]) != 0
        return paste_outlier(image, label, outlier_image, outlier_mask, rng, self.outlier_label)


# ---------------------------------------------------------------------------------------- geometric
class RandomResize:
    """Rescale by a factor drawn uniformly from `scale_range` (bilinear image, nearest label).

    The official Cityscapes configuration draws the short side from {512, 614, ..., 2048} for 1024-px images,
    i.e. factors 0.5..2.0; a continuous factor is used here.
    """

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)):
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range={scale_range}: expected 0 < low <= high")
        self.scale_range = (float(low), float(high))

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        factor = rng.uniform(*self.scale_range)
        height, width = label.shape
        size = (max(int(round(width * factor)), 1), max(int(round(height * factor)), 1))
        if size == (width, height):
            return image, label
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        return image, label


class RandomCrop:
    """Crop `crop_size` (height, width) at a random position; pad first (image 0, label `ignore_label`)
    at the bottom/right where the image is smaller."""

    def __init__(self, crop_size: tuple[int, int], ignore_label: int = IGNORE_LABEL):
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ValueError(f"crop_size={crop_size}: expected (height, width) of positive integers")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.ignore_label = ignore_label

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        crop_h, crop_w = self.crop_size
        height, width = label.shape
        if height < crop_h or width < crop_w:
            pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=self.ignore_label)
            height, width = label.shape
        y = int(rng.integers(0, height - crop_h + 1))
        x = int(rng.integers(0, width - crop_w + 1))
        return image[y : y + crop_h, x : x + crop_w], label[y : y + crop_h, x : x + crop_w]


class RandomHorizontalFlip:
    def __init__(self, probability: float = 0.5):
        self.probability = probability

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        if rng.random() < self.probability:
            return image[:, ::-1], label[:, ::-1]
        return image, label


# ---------------------------------------------------------------------------------------- photometric
class PhotometricDistortion:
    """detectron2's ColorAugSSDTransform (SSD-style colour jitter), on RGB uint8 images.

    Each step applies with probability 0.5: brightness (add U(-32, 32)), then either contrast before or after
    saturation and hue (coin flip): contrast (multiply by U(0.5, 1.5)), saturation (multiply HSV saturation by
    U(0.5, 1.5)), hue (shift by an integer in [-18, 18] on OpenCV's 180-step hue circle). Values are clipped to
    0..255 after every step. HSV conversions use PIL (hue on a 256-step circle, the shift scaled to match).
    """

    def __init__(self, brightness_delta: float = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    @staticmethod
    def _affine(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def _hsv(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        do_saturation, do_hue = rng.random() < 0.5, rng.random() < 0.5
        alpha = rng.uniform(*self.saturation_range)
        shift = int(rng.integers(-self.hue_delta, self.hue_delta + 1))
        do_saturation &= alpha != 1.0
        do_hue &= shift != 0
        if not (do_saturation or do_hue):
            return image  # the HSV round trip is lossy: skip it when it would change nothing
        hsv = np.array(Image.fromarray(image).convert("HSV"))
        if do_saturation:
            hsv[..., 1] = self._affine(hsv[..., 1], alpha=alpha)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(round(shift * 256 / 180))) % 256
        return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        do_brightness, contrast_first, do_contrast = rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.5
        beta = rng.uniform(-self.brightness_delta, self.brightness_delta)
        alpha = rng.uniform(*self.contrast_range)
        if do_brightness:
            image = self._affine(image, beta=beta)
        if do_contrast and contrast_first:
            image = self._affine(image, alpha=alpha)
        image = self._hsv(image, rng)
        if do_contrast and not contrast_first:
            image = self._affine(image, alpha=alpha)
        return image, label


# ------------------------------------------------------------------------------------------- chaining
class Compose:
    """Apply transforms in order, threading one random generator through them."""

    def __init__(self, transforms: Sequence[SegmentationTransform]):
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        for transform in self.transforms:
            image, label = transform(image, label, rng)
        # Writable, contiguous arrays: PIL-decoded inputs are read-only and torch refuses those.
        return np.require(image, requirements="CW"), np.require(label, requirements="CW")


def build_train_augmentation(crop_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                             outlier_source: Sequence[Mapping[str, Any]] | None = None,
                             outlier_probability: float = 0.2, outlier_label: int = OUTLIER_LABEL,
                             ignore_label: int = IGNORE_LABEL, color_jitter: bool = True, flip: bool = True,
                             mask_column: str = "mask") -> Compose:
    """The official training chain: [outlier paste], resize, crop, [colour jitter], [flip].

    Stage 1 (closed set) passes no `outlier_source`; stage 2 passes one (COCO, a mask folder or SynthRoad).
    `crop_size` is (height, width): (512, 1024) for Mask2Former's stage 1, (380, 760) for Mask2Anomaly.
    """
    transforms: list[SegmentationTransform] = []
    if outlier_source is not None:
        transforms.append(OutlierPaste(outlier_source, outlier_probability, outlier_label, mask_column=mask_column))
    transforms += [RandomResize(scale_range), RandomCrop(crop_size, ignore_label)]
    if color_jitter:
        transforms.append(PhotometricDistortion())
    if flip:
        transforms.append(RandomHorizontalFlip())
    return Compose(transforms)


class TrainTransform:
    """A `datasets` batch transform: ``dataset.with_transform(TrainTransform(augmentation, seed))``.

    Needs the sample index of each row (column `SAMPLE_INDEX_COLUMN`, added by `add_sample_index`). Returns
    ``{"image": [uint8 (h, w, 3)], "label": [uint8 (h, w)], "sample_index": [int]}``. Call `set_epoch` before
    each epoch (before the DataLoader iterator is created, so that workers receive the new epoch).
    """

    def __init__(self, augmentation: SegmentationTransform, seed: int = 0, image_column: str = "image",
                 label_column: str = "label"):
        self.augmentation, self.seed, self.epoch = augmentation, int(seed), 0
        self.image_column, self.label_column = image_column, label_column

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        if SAMPLE_INDEX_COLUMN not in batch:
            raise KeyError(f"the batch has no {SAMPLE_INDEX_COLUMN!r} column (columns: {sorted(batch)}); "
                           "prepare the dataset with add_sample_index(dataset)")
        images, labels = [], []
        for image, label, index in zip(batch[self.image_column], batch[self.label_column], batch[SAMPLE_INDEX_COLUMN]):
            image, label = to_image_array(image), to_label_array(label)
            if image.shape[:2] != label.shape:
                raise ValueError(f"sample {index}: image {image.shape[:2]} and label {label.shape} differ in size")
            image, label = self.augmentation(image, label, sample_rng(self.seed, self.epoch, index))
            images.append(image)
            labels.append(label)
        return {"image": images, "label": labels, SAMPLE_INDEX_COLUMN: list(batch[SAMPLE_INDEX_COLUMN])}


def add_sample_index(dataset):
    """Add the column `SAMPLE_INDEX_COLUMN` (0..n-1) that `TrainTransform` seeds each sample with."""
    if SAMPLE_INDEX_COLUMN in dataset.column_names:
        return dataset
    return dataset.add_column(SAMPLE_INDEX_COLUMN, list(range(len(dataset))))
