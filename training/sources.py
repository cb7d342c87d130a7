"""Where training data comes from: the registry of road and outlier sources, the augmented training set of a
stage and the validation splits.

A source spec is a mapping ``{source: NAME, **arguments of its reader}`` (see `load_source`); the readers are
in `data` (Cityscapes, COCO, folders) and `synthroad`.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mask2anomaly_eval.io import read_label_png
from modeling_mask2anomaly import OUTLIER_LABEL
from modeling_mask2anomaly.image_processing_mask2anomaly import Mask2AnomalyImageProcessor

from . import data, synthroad
from .config import DataSettings, TrainingConfig
from .transforms import Compose, TrainTransform, add_sample_index, build_train_augmentation


def _folder(root: str, image_dir: str = "images", label_dir: str = "labels"):
    """A road-scene folder: ``images/`` + ``labels/`` of train ids (what ``mask2anomaly-synthroad --split train``
    writes)."""
    return data.paired_folder_dataset(root, image_dir=image_dir, label_dir=label_dir, label_column="label")


ROAD_SOURCES = {"cityscapes": data.cityscapes_dataset, "synthroad": synthroad.synthroad_dataset, "folder": _folder}
OUTLIER_SOURCES = {"coco": data.coco_outlier_dataset, "synthroad": data.synthroad_outlier_dataset,
                   "folder": data.paired_folder_dataset}


def load_source(spec: Mapping[str, Any], outliers: bool = False, where: str = "data"):
    """The `datasets.Dataset` a source spec `{source: NAME, **reader arguments}` names.

    Road sources (``cityscapes``, ``synthroad``, ``folder``) have columns ``image`` and ``label``; outlier
    sources (``coco``, ``synthroad``, ``folder``) have ``image`` and ``mask``.
    """
    sources = OUTLIER_SOURCES if outliers else ROAD_SOURCES
    if not isinstance(spec, Mapping) or "source" not in spec:
        raise ValueError(f"{where} must be a mapping with a 'source' key (one of {', '.join(sources)}); got {spec!r}")
    arguments = dict(spec)
    name = arguments.pop("source")
    if name not in sources:
        raise ValueError(f"{where}.source={name!r} is not one of {', '.join(sources)}")
    reader = sources[name]
    try:
        inspect.signature(reader).bind(**arguments)
    except TypeError as error:
        raise ValueError(f"{where}: bad arguments {arguments} for source {name!r} "
                         f"({reader.__name__}{inspect.signature(reader)}): {error}") from None
    return reader(**arguments)


class TrainingDataError(ValueError):
    """A training image or label that cannot be trained on; the message names the file."""


def _open_encoded(value: Mapping[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])


def check_road_data(road: Any, num_labels: int, extra_labels: tuple[int, ...], where: str = "data.train") -> int:
    """Read every image and label of a road source (columns ``image``, ``label``) once, before training, and raise
    `TrainingDataError` naming the first bad file: an image or label that cannot be decoded (truncated, not an
    image), a label whose size differs from its image's, or label values other than the class ids
    ``0..num_labels-1`` and `extra_labels` (the outlier and ignore values). Returns the number of items checked."""
    raw = road.cast_column("image", datasets.Image(decode=False)).cast_column("label", datasets.Image(decode=False))
    allowed = np.array([*range(num_labels), *extra_labels], dtype=np.int64)
    for index, item in enumerate(tqdm(raw, desc=f"checking {where}", unit="image", leave=False)):
        names = {key: item[key].get("path") or f"{where} item {index} ({key})" for key in ("image", "label")}
        try:
            with _open_encoded(item["image"]) as image:
                image.load()
                size = image.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise TrainingDataError(f"{names['image']}: cannot read the training image ({error})") from None
        try:
            with _open_encoded(item["label"]) as opened:
                label = read_label_png(opened, name=names["label"])
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:
            raise TrainingDataError(f"{names['label']}: cannot read the training label ({error})") from None
        except ValueError as error:
            raise TrainingDataError(str(error)) from None
        if label.shape != (size[1], size[0]):
            raise TrainingDataError(f"{names['label']}: the label is {label.shape[1]}x{label.shape[0]} but its image "
                                    f"{names['image']} is {size[0]}x{size[1]}; expected the same size")
        values = np.unique(label).astype(np.int64)
        bad = values[~np.isin(values, allowed)]
        if bad.size:
            raise TrainingDataError(
                f"{names['label']}: label values {sorted(bad.tolist())[:10]} are not class ids 0..{num_labels - 1} "
                f"nor {', '.join(map(str, extra_labels))} (outlier, ignore)")
    return len(raw)


def stage_data(config: TrainingConfig, stage: int, processor: Mask2AnomalyImageProcessor | None = None,
               num_labels: int | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """The augmented training set of `stage` (outliers pasted when the stage uses outlier exposure), its
    `TrainTransform` (see `training_dataset`) and the validation splits.

    Pasted pixels get `processor.outlier_label`, the value the collator turns into `outlier_labels`; without a
    processor, the one `config.processor` describes (`OUTLIER_LABEL` unless it sets `outlier_label`). With
    `num_labels` and ``data.check_data``, every training image and label is checked first (`check_road_data`).
    """
    settings = config.stage(stage)
    outlier_label = (processor.outlier_label if processor is not None
                     else int(config.processor.get("outlier_label", OUTLIER_LABEL)))
    road = load_source(config.data.train, where="data.train")
    if num_labels is not None and config.data.check_data:
        ignore = processor.ignore_index if processor is not None else 255
        check_road_data(road, num_labels, (outlier_label, ignore), where="data.train")
    outliers = None
    if settings.outlier_exposure:
        if config.data.outliers is None:
            raise ValueError(f"stage {stage} uses outlier exposure but data.outliers is not set")
        outliers = load_source(config.data.outliers, outliers=True, where="data.outliers")
    dataset, transform = training_dataset(road, make_augmentation(config.data, outliers, outlier_label),
                                          config.training.seed)
    return dataset, transform, validation_splits(config.data)


def validation_splits(data: DataSettings) -> dict[str, Any]:
    """The anomaly splits of `data.validation` as datasets (a split set to null, e.g. by an override, is skipped)."""
    return {name: load_source(spec, where=f"data.validation.{name}")
            for name, spec in data.validation.items() if spec is not None}


def training_dataset(road, augmentation: Any, seed: int) -> tuple[Any, Any]:
    """`road` with a `sample_index` column and the augmentation applied on access, and the applied
    `transforms.TrainTransform` (its generator for each image is a function of (seed, epoch, index) only; call
    its `set_epoch` before creating an epoch's DataLoader)."""
    transform = TrainTransform(augmentation, seed)
    return add_sample_index(road).with_transform(transform), transform



def make_augmentation(data: DataSettings, outliers: Any | None, outlier_label: int = OUTLIER_LABEL) -> Compose:
    """The official training chain of `transforms.py`: [outlier paste], resize, crop, [colour jitter], [flip].

    Pasted pixels are labelled `outlier_label`: it must be the processor's `outlier_label`, or the collator
    sees a class label instead of outliers.
    """
    if len(data.crop_size) != 2 or len(data.scale_range) != 2:
        raise ValueError(f"data.crop_size={data.crop_size} and data.scale_range={data.scale_range}: expected two "
                         f"values each (height, width) and (low, high)")
    return build_train_augmentation(
        crop_size=tuple(data.crop_size), scale_range=tuple(data.scale_range), outlier_source=outliers,
        outlier_probability=data.outlier_probability, outlier_label=outlier_label, color_jitter=data.color_jitter, flip=data.hflip,
    )
