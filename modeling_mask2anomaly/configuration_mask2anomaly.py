"""Configuration of Mask2Anomaly: a Mask2Former configuration plus the anomaly-specific network and loss settings.

The config describes the network only. Post-processing settings (`refine*`, `anomaly_scorer`, `anomaly_threshold`,
`flip_tta`) and the data encoding `outlier_label` belong to the image processor (preprocessor_config.json).
Legacy rule: a config.json (or keyword arguments) that still carries those keys keeps loading; the config checks
them, drops them with one warning and keeps them in `legacy_postprocessing` (never saved), where
`Mask2AnomalyImageProcessor.from_model_config` and `load_model_and_processor` take them only for keys that the
processor's own file does not hold.

This file travels to the Hub as remote code: it imports only the standard library, transformers and its sibling
files.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import Mask2FormerConfig, ResNetConfig
from transformers.utils import logging

from .scorers import ANOMALY_SCORERS, get_scorer

logger = logging.get_logger(__name__)

# Cityscapes' 19 evaluation classes, in train-id order.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

# The "stuff" classes whose confident masks suppress anomaly scores (train ids 2..10: building .. sky);
# road (0) and sidewalk (1) are excluded because anomalies lie on them.
CITYSCAPES_REFINE_CLASS_IDS: tuple[int, ...] = tuple(range(2, 11))

# The value of pasted outlier pixels in training label maps (the official mapper's 254): the one definition that
# the image processor (the setting's owner, `outlier_label`), the training transforms and SynthRoad all use.
OUTLIER_LABEL = 254

CONTRASTIVE_LOSS_FORMS = ("margin", "bce", "none")
CONTRASTIVE_LOSS_ALIGNMENTS = ("official", "padded")

# Keys that older config.json files carry but that belong to the image processor (see the module docstring).
LEGACY_PROCESSOR_KEYS: tuple[str, ...] = (
    "outlier_label", "refine", "refine_score_threshold", "refine_class_ids", "refine_min_queries", "anomaly_scorer",
    "flip_tta", "anomaly_threshold",
)


def legacy_processor_settings(config: Any) -> dict[str, Any]:
    """The image-processor settings a model config still carries (an older config.json, or a config object of older
    code that had them as fields), keyed by `LEGACY_PROCESSOR_KEYS` names; empty for a current config."""
    legacy = getattr(config, "legacy_postprocessing", None)
    if legacy is None:
        legacy = {key: getattr(config, key) for key in LEGACY_PROCESSOR_KEYS if hasattr(config, key)}
    return {key: list(value) if key == "refine_class_ids" else value for key, value in legacy.items()}


def resnet_backbone(**overrides) -> ResNetConfig:
    """A transformers `ResNetConfig` laid out like detectron2's ResNet in Mask2Anomaly: bottleneck blocks, the
    stride in the 3x3 conv (`STRIDE_IN_1X1: False`) and the four stage outputs; by default ResNet-50.
    `overrides` are `ResNetConfig` arguments."""
    values = dict(
        embedding_size=64,
        hidden_sizes=[256, 512, 1024, 2048],
        depths=[3, 4, 6, 3],
        layer_type="bottleneck",
        downsample_in_bottleneck=False,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    values.update(overrides)
    return ResNetConfig(**values)


@strict
class Mask2AnomalyConfig(Mask2FormerConfig):
    r"""
    Configuration of a Mask2Anomaly model (Rai et al., ICCV 2023): Mask2Former with global masked attention,
    trained with a mask contrastive loss on outlier-exposure data, and scored per pixel by mask-level
    anomaly scoring with refinement.

    Defaults equal the authors' released Cityscapes models: ResNet-50 backbone, 100 queries, 9 decoder
    layers (``decoder_layers=10`` counts the query head as in detectron2's ``DEC_LAYERS``), 19 Cityscapes
    classes. Everything of [`Mask2FormerConfig`] applies; the additions (network and loss only) are:

    global_masked_attention (`bool`, defaults to `True`):
        Replace each masked cross-attention of the transformer decoder by global masked attention: one
        attention over the foreground of the query's mask and one (with its own weights) over its background,
        summed before the residual and LayerNorm. `False` gives a plain Mask2Former.
    contrastive_loss (`str`, defaults to `"margin"`):
        Mask contrastive loss used when `outlier_labels` are passed: `"margin"` (the official form that
        trained the released weights), `"bce"` (the official alternative) or `"none"`.
    contrastive_margin (`float`, defaults to 1.0):
        Margin m of the `"margin"` form.
    contrastive_weight (`float`, defaults to 1.0):
        Weight of the contrastive loss in the total loss (applied to the final and every auxiliary term).
    contrastive_loss_alignment (`str`, defaults to `"official"`):
        Which label grid the contrastive loss compares the anomaly score with. The score lives on the mask-logit
        grid of the *padded* batch. `"official"` (what trained the released weights): the score of the whole
        padded grid is resized (bilinear, `align_corners=True`) onto each image's *un-padded* size, read from
        the `pixel_mask` passed to `forward`, and compared with `outlier_labels[:, :h, :w]`; when the image
        needed padding, the padded grid is squeezed onto the image rather than cropped, so score and labels are
        slightly misaligned, as in the official code. `"padded"`: the score is resized onto the full padded
        `outlier_labels` grid (geometrically aligned; padding pixels count as inliers). The two agree when no
        image of the batch is padded.

    Post-processing settings and `outlier_label` are the image processor's; a config given them (an older
    config.json) keeps them in `legacy_postprocessing` only (see the module docstring).
    """

    model_type = "mask2anomaly"
    backbones_supported = ["swin", "resnet"]

    global_masked_attention: bool = True
    contrastive_loss: str = "margin"
    contrastive_margin: float = 1.0
    contrastive_weight: float = 1.0
    contrastive_loss_alignment: Literal["official", "padded"] = "official"

    def __post_init__(self, **kwargs):
        legacy = {key: kwargs.pop(key) for key in LEGACY_PROCESSOR_KEYS if key in kwargs}
        if "refine_class_ids" in legacy:
            legacy["refine_class_ids"] = [int(i) for i in legacy["refine_class_ids"]]
        if legacy:
            logger.warning_once(
                f"Mask2AnomalyConfig: the image-processor settings {', '.join(sorted(legacy))} are not network "
                "settings; they are dropped from the config and used only where the image processor "
                "(preprocessor_config.json) has none. Save the processor to keep them."
            )
        self.legacy_postprocessing: dict[str, Any] = legacy
        self._check_values()  # here, before the strict dataclass's validators wrap the message in several lines
        if self.backbone_config is None:
            self.backbone_config = resnet_backbone()
        if self.id2label is None and kwargs.get("num_labels") is None:
            self.id2label = dict(enumerate(CITYSCAPES_CLASSES))
            self.label2id = {name: i for i, name in self.id2label.items()}
        super().__post_init__(**kwargs)

    # (attribute, smallest value) of the sizes and counts that must be whole numbers of at least that value
    _MINIMUM_INTEGERS = (
        ("feature_size", 1), ("mask_feature_size", 1), ("hidden_dim", 1), ("encoder_feedforward_dim", 1),
        ("encoder_layers", 0), ("decoder_layers", 1), ("num_attention_heads", 1), ("dim_feedforward", 1),
        ("common_stride", 1), ("num_queries", 1), ("train_num_points", 1),
    )
    # (attribute, lowest, highest) of the finite numbers
    _NUMBER_RANGES = (
        ("dropout", 0.0, 1.0), ("no_object_weight", 0.0, None), ("class_weight", 0.0, None),
        ("mask_weight", 0.0, None), ("dice_weight", 0.0, None), ("oversample_ratio", 1.0, None),
        ("importance_sample_ratio", 0.0, 1.0), ("contrastive_margin", None, None), ("contrastive_weight", 0.0, None),
        ("init_std", 0.0, None), ("init_xavier_std", 0.0, None),
    )

    def _check_values(self) -> None:
        """Sizes, counts and weights that would fail deep in torch (or train silently wrong): one ValueError naming
        the key, its value and what is expected."""
        for key, minimum in self._MINIMUM_INTEGERS:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"Mask2AnomalyConfig: {key}={value!r}; expected a whole number >= {minimum}")
        for key, lowest, highest in self._NUMBER_RANGES:
            value = getattr(self, key)
            valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not valid or (lowest is not None and value < lowest) or (highest is not None and value > highest):
                bounds = f" in [{lowest}, {highest}]" if highest is not None else (
                    f" >= {lowest}" if lowest is not None else "")
                raise ValueError(f"Mask2AnomalyConfig: {key}={value!r}; expected a finite number{bounds}")
        heads = self.num_attention_heads
        for key in ("hidden_dim", "feature_size"):
            if getattr(self, key) % heads:
                raise ValueError(f"Mask2AnomalyConfig: {key}={getattr(self, key)} is not divisible by "
                                 f"num_attention_heads={heads}; expected a multiple of it (each head gets an equal "
                                 f"share of the width)")
        if self.feature_size % 32:
            raise ValueError(f"Mask2AnomalyConfig: feature_size={self.feature_size}; expected a multiple of 32 "
                             f"(the pixel decoder's GroupNorm has 32 groups)")

    def validate_architecture(self):
        super().validate_architecture()
        self._check_values()
        if self.contrastive_loss not in CONTRASTIVE_LOSS_FORMS:
            raise ValueError(
                f"contrastive_loss={self.contrastive_loss!r} is not one of {', '.join(CONTRASTIVE_LOSS_FORMS)}"
            )
        if self.contrastive_loss_alignment not in CONTRASTIVE_LOSS_ALIGNMENTS:
            raise ValueError(
                f"contrastive_loss_alignment={self.contrastive_loss_alignment!r} is not one of "
                f"{', '.join(CONTRASTIVE_LOSS_ALIGNMENTS)}"
            )
        # legacy post-processing keys are checked here too, so that a bad old config.json fails when it is read
        legacy = getattr(self, "legacy_postprocessing", {})
        if "anomaly_scorer" in legacy:
            get_scorer(legacy["anomaly_scorer"])
        bad = [i for i in legacy.get("refine_class_ids", ()) if not 0 <= int(i) < self.num_labels]
        if bad:
            raise ValueError(f"refine_class_ids {bad} are outside the {self.num_labels} classes of this model")

    def to_dict(self) -> dict[str, Any]:
        # legacy post-processing values live in the processor's file once saved: never written back to config.json
        output = super().to_dict()
        output.pop("legacy_postprocessing", None)
        return output

    @classmethod
    def paper(cls, **kwargs) -> Mask2AnomalyConfig:
        """The released Cityscapes configuration (ResNet-50, 100 queries, 9 decoder layers, 19 classes)."""
        return cls(backbone_config=resnet_backbone(), **kwargs)

    @classmethod
    def tiny(cls, **kwargs) -> Mask2AnomalyConfig:
        """A small configuration (about 0.15M parameters) for tests and CPU demos; same 19 Cityscapes classes."""
        backbone = resnet_backbone(embedding_size=16, hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1])
        defaults = dict(
            backbone_config=backbone,
            feature_size=32,
            mask_feature_size=32,
            hidden_dim=32,
            encoder_feedforward_dim=64,
            encoder_layers=2,
            decoder_layers=4,
            num_attention_heads=4,
            dim_feedforward=64,
            num_queries=20,
            train_num_points=1024,
        )
        defaults.update(kwargs)
        return cls(**defaults)


__all__ = [
    "ANOMALY_SCORERS",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_REFINE_CLASS_IDS",
    "LEGACY_PROCESSOR_KEYS",
    "Mask2AnomalyConfig",
    "OUTLIER_LABEL",
    "legacy_processor_settings",
    "resnet_backbone",
]
