"""The model and image processor to train: built from `model` settings or loaded from a stage-1 folder, plus
the backbone helpers (initial weights, freezing, train mode)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation
from modeling_mask2anomaly.configuration_mask2anomaly import resnet_backbone
from modeling_mask2anomaly.conversion import ConversionError, backbone
from modeling_mask2anomaly.image_processing_mask2anomaly import Mask2AnomalyImageProcessor

from .config import ModelSettings, TrainingConfig

# Fields of a stage-1 model's config that stage 2 may change; everything else is architecture.
STAGE2_MUTABLE_CONFIG_KEYS = (
    "contrastive_loss", "contrastive_margin", "contrastive_weight", "class_weight", "mask_weight", "dice_weight",
    "no_object_weight", "train_num_points", "oversample_ratio", "importance_sample_ratio", "use_auxiliary_loss",
    "contrastive_loss_alignment",
)  # post-processing settings belong to the image processor: override them as `processor.<name>=...`


def model_config_from_settings(settings: ModelSettings) -> Mask2AnomalyConfig:
    """A fresh `Mask2AnomalyConfig` from `model.preset` and `model.config`."""
    presets = {"paper": Mask2AnomalyConfig.paper, "tiny": Mask2AnomalyConfig.tiny}
    if settings.preset not in presets:
        raise ValueError(f"model.preset={settings.preset!r} is not one of {', '.join(presets)}")
    overrides = dict(settings.config)
    if isinstance(overrides.get("backbone_config"), Mapping):
        overrides["backbone_config"] = resnet_backbone(**overrides["backbone_config"])
    valid = {f.name for f in dataclasses.fields(Mask2AnomalyConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"model.config keys {unknown} are not Mask2AnomalyConfig fields; valid: {', '.join(sorted(valid))}")
    return presets[settings.preset](**overrides)


def load_backbone_checkpoint(model: Mask2AnomalyForUniversalSegmentation, path: str) -> None:
    """Load the backbone's starting weights (`model.backbone_checkpoint`): a torchvision-layout ResNet state dict
    (Barlow Twins' `resnet50.pth`), detectron2's converted `.pkl`, or transformers names; strictly, never
    unpickling code (`modeling_mask2anomaly.conversion.backbone`)."""
    try:
        backbone.load_backbone_checkpoint(model, path)
    except ConversionError as error:
        raise ValueError(f"model.backbone_checkpoint: {error}") from None


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ResNet/Swin backbone of a (possibly wrapped) Mask2Anomaly model."""
    model = getattr(model, "module", model)
    return model.model.pixel_level_module.encoder


def build_model(config: TrainingConfig, init_from: str | None = None
                ) -> tuple[Mask2AnomalyForUniversalSegmentation, Mask2AnomalyImageProcessor]:
    """The model and image processor to train: fresh from `config.model`, or loaded from a model folder."""
    if init_from is None:
        model = Mask2AnomalyForUniversalSegmentation(model_config_from_settings(config.model))
        if config.model.backbone_checkpoint:
            load_backbone_checkpoint(model, config.model.backbone_checkpoint)
        processor = Mask2AnomalyImageProcessor.from_model_config(model.config, **config.processor)
        return model, processor
    if not os.path.isfile(os.path.join(init_from, "config.json")):
        raise FileNotFoundError(f"--init-from {init_from!r} is not a model folder (no config.json); expected the "
                                f"--output-dir of a stage-1 run")
    model = Mask2AnomalyForUniversalSegmentation.from_pretrained(init_from)
    for key, value in config.model.config.items():
        if key in STAGE2_MUTABLE_CONFIG_KEYS:
            setattr(model.config, key, value)
    processor = Mask2AnomalyImageProcessor.from_pretrained(init_from, **config.processor)
    return model, processor


def freeze_backbone(model: torch.nn.Module) -> None:
    """Stop training the backbone: no gradients, and BatchNorm statistics frozen (detectron2's FrozenBN)."""
    backbone = backbone_of(model)
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    backbone.eval()


def set_train_mode(model: torch.nn.Module, frozen_backbone: bool) -> None:
    """`model.train()`, keeping a frozen backbone in eval mode so its BatchNorm statistics stay fixed."""
    model.train()
    if frozen_backbone:
        backbone_of(model).eval()
