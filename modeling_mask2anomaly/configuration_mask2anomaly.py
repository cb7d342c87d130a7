"""Configuration of Mask2Anomaly: a Mask2Former configuration plus the anomaly-specific settings.

This file travels to the Hub as remote code: it imports only the standard library and transformers.
"""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import Mask2FormerConfig, ResNetConfig

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
# the config, the image processor, the training transforms and SynthRoad all use.
OUTLIER_LABEL = 254

CONTRASTIVE_LOSS_FORMS = ("margin", "bce", "none")
CONTRASTIVE_LOSS_ALIGNMENTS = ("official", "padded")
ANOMALY_SCORERS = ("mask2anomaly", "rba", "eam", "msp", "max_logit", "energy")


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
    classes. Everything of [`Mask2FormerConfig`] applies; the additions are:

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
    outlier_label (`int`, defaults to 254):
        Value marking pasted outlier pixels in segmentation maps; never turned into a class mask.
    refine (`bool`, defaults to `True`):
        Mask refinement at inference: pixels covered by a confident "stuff" mask get anomaly score 0.
    refine_score_threshold (`float`, defaults to 0.95):
        A query takes part in refinement when its max class probability (no-object included) exceeds this.
    refine_class_ids (`list[int]`, defaults to Cityscapes train ids 2..10):
        Classes whose confident masks refine the anomaly map.
    anomaly_scorer (`str`, defaults to `"mask2anomaly"`):
        Per-pixel anomaly score: `"mask2anomaly"` (1 - max_c S_c), `"rba"`, `"eam"`, `"msp"`, `"max_logit"`,
        `"energy"` (see the image processor for the formulas).
    flip_tta (`bool`, defaults to `True`):
        Average the anomaly map with that of the horizontally flipped image.
    anomaly_threshold (`float`, defaults to 0.5):
        Decision threshold on the anomaly score when a binary anomaly mask is needed (pipeline, widget).
    """

    model_type = "mask2anomaly"
    backbones_supported = ["swin", "resnet"]

    global_masked_attention: bool = True
    contrastive_loss: str = "margin"
    contrastive_margin: float = 1.0
    contrastive_weight: float = 1.0
    contrastive_loss_alignment: Literal["official", "padded"] = "official"
    outlier_label: int = OUTLIER_LABEL
    refine: bool = True
    refine_score_threshold: float = 0.95
    refine_class_ids: list[int] | tuple[int, ...] = CITYSCAPES_REFINE_CLASS_IDS
    anomaly_scorer: str = "mask2anomaly"
    flip_tta: bool = True
    anomaly_threshold: float = 0.5

    def __post_init__(self, **kwargs):
        if self.backbone_config is None:
            self.backbone_config = resnet_backbone()
        if self.id2label is None and kwargs.get("num_labels") is None:
            self.id2label = dict(enumerate(CITYSCAPES_CLASSES))
            self.label2id = {name: i for i, name in self.id2label.items()}
        super().__post_init__(**kwargs)
        self.refine_class_ids = [int(i) for i in self.refine_class_ids]

    def validate_architecture(self):
        super().validate_architecture()
        if self.contrastive_loss not in CONTRASTIVE_LOSS_FORMS:
            raise ValueError(
                f"contrastive_loss={self.contrastive_loss!r} is not one of {', '.join(CONTRASTIVE_LOSS_FORMS)}"
            )
        if self.contrastive_loss_alignment not in CONTRASTIVE_LOSS_ALIGNMENTS:
            raise ValueError(
                f"contrastive_loss_alignment={self.contrastive_loss_alignment!r} is not one of "
                f"{', '.join(CONTRASTIVE_LOSS_ALIGNMENTS)}"
            )
        if self.anomaly_scorer not in ANOMALY_SCORERS:
            raise ValueError(f"anomaly_scorer={self.anomaly_scorer!r} is not one of {', '.join(ANOMALY_SCORERS)}")
        bad = [i for i in self.refine_class_ids if not 0 <= int(i) < self.num_labels]
        if bad:
            raise ValueError(f"refine_class_ids {bad} are outside the {self.num_labels} classes of this model")

    @classmethod
    def paper(cls, **kwargs) -> "Mask2AnomalyConfig":
        """The released Cityscapes configuration (ResNet-50, 100 queries, 9 decoder layers, 19 classes)."""
        return cls(backbone_config=resnet_backbone(), **kwargs)

    @classmethod
    def tiny(cls, **kwargs) -> "Mask2AnomalyConfig":
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


__all__ = ["Mask2AnomalyConfig", "CITYSCAPES_CLASSES", "CITYSCAPES_REFINE_CLASS_IDS", "resnet_backbone"]
