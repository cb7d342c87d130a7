"""Turn augmented (image, label map) pairs into Mask2Anomaly training examples, and examples into batches.

Shared by the accelerate loop (`mask2anomaly_training.train`) and the HF Trainer route
(`mask2anomaly_training.trainer`), so that both feed the model exactly the same tensors:

- `encode_example` runs the image processor on one augmented crop *without resizing* (the augmentation has
  already fixed the size): normalised `pixel_values` padded to a multiple of 32, `pixel_mask`, the per-class
  binary `mask_labels` with their `class_labels`, and `outlier_labels` (1 where the map holds the outlier label
  254, 0 elsewhere, void included, as in the official mapper).
- `TrainingCollator` does both for rows of augmented (image, label) pairs, inside the loader workers.
- `collate_examples` stacks the fixed-size tensors and keeps the per-image label lists as lists, since every
  image has its own number of masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

# Keys every training example holds; `mask_labels` and `class_labels` are per-image lists in a batch.
STACKED_KEYS: tuple[str, ...] = ("pixel_values", "pixel_mask", "outlier_labels")
LIST_KEYS: tuple[str, ...] = ("mask_labels", "class_labels")
# What the model takes as labels (the Trainer's `label_names`).
LABEL_NAMES: tuple[str, ...] = ("mask_labels", "class_labels", "outlier_labels")


def encode_example(processor: Any, image: np.ndarray, label: np.ndarray) -> dict[str, torch.Tensor]:
    """One training example from an augmented RGB uint8 image (H, W, 3) and its label map (H, W).

    Returns `pixel_values` (3, Hp, Wp) float32, `pixel_mask` (Hp, Wp), `mask_labels` (K, Hp, Wp) float32,
    `class_labels` (K,) int64 and `outlier_labels` (Hp, Wp) int64, where (Hp, Wp) is (H, W) padded to the
    processor's `size_divisor` (padding is void in the labels).
    """
    image = np.asarray(image)
    label = np.asarray(label)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3); got {image.dtype} {image.shape}")
    if label.shape != image.shape[:2]:
        raise ValueError(f"label map of shape {label.shape} does not match its image {image.shape[:2]}")
    encoded = processor(images=[image], segmentation_maps=[label], do_resize=False, return_tensors="pt")
    return {
        "pixel_values": encoded["pixel_values"][0],
        "pixel_mask": encoded["pixel_mask"][0],
        "mask_labels": encoded["mask_labels"][0],
        "class_labels": encoded["class_labels"][0],
        "outlier_labels": encoded["outlier_labels"][0],
    }


class TrainingCollator:
    """`collate_fn` for augmented rows `{"image": (H, W, 3) uint8, "label": (H, W) uint8, ...}` (the output of
    `mask2anomaly_training.transforms.TrainTransform`): encodes each row with `encode_example` and batches them
    with `collate_examples`. Runs inside the DataLoader workers, so the encoding is parallel too.


    With `outlier_labels=False` (stage 1, closed set) the batch has no `outlier_labels`, so the model adds no
    contrastive loss.
    """

    def __init__(self, processor: Any, outlier_labels: bool = True, image_column: str = "image",
                 label_column: str = "label"):
        self.processor = processor
        self.outlier_labels = outlier_labels
        self.image_column, self.label_column = image_column, label_column

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = collate_examples(
            [encode_example(self.processor, row[self.image_column], row[self.label_column]) for row in rows]
        )
        if not self.outlier_labels:
            del batch["outlier_labels"]
        return batch


def collate_examples(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch examples from `encode_example`: `pixel_values` (B, 3, H, W), `pixel_mask` (B, H, W) and
    `outlier_labels` (B, H, W) stacked; `mask_labels` and `class_labels` kept as lists of B tensors.

    Other keys are dropped. All examples must have the same padded size (fixed-size crops guarantee it).
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    missing = [key for key in STACKED_KEYS + LIST_KEYS if key not in examples[0]]
    if missing:
        raise KeyError(f"example lacks {missing}; expected the keys {list(STACKED_KEYS + LIST_KEYS)} of encode_example")
    shapes = {tuple(example["pixel_values"].shape) for example in examples}
    if len(shapes) != 1:
        raise ValueError(f"examples of different sizes {sorted(shapes)} cannot be stacked; use a fixed crop size")
    batch: dict[str, Any] = {key: torch.stack([torch.as_tensor(e[key]) for e in examples]) for key in STACKED_KEYS}
    for key in LIST_KEYS:
        batch[key] = [torch.as_tensor(e[key]) for e in examples]
    return batch


__all__ = ["LABEL_NAMES", "LIST_KEYS", "STACKED_KEYS", "TrainingCollator", "collate_examples", "encode_example"]
