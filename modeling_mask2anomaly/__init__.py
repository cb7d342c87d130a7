"""Mask2Anomaly (ICCV 2023) for transformers.

Importing this package registers the model with transformers' Auto classes: `AutoConfig`, `AutoModel` (the
base model), `AutoModelForUniversalSegmentation`, `AutoModelForImageSegmentation` (for the pipeline) and,
once present, `AutoImageProcessor`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageSegmentation,
    AutoModelForUniversalSegmentation,
)

from .configuration_mask2anomaly import CITYSCAPES_CLASSES, CITYSCAPES_REFINE_CLASS_IDS, Mask2AnomalyConfig
from .modeling_mask2anomaly import (
    Mask2AnomalyForUniversalSegmentation,
    Mask2AnomalyModel,
    Mask2AnomalyPreTrainedModel,
    class_mask_scores,
    mask_contrastive_loss,
)

AutoConfig.register(Mask2AnomalyConfig.model_type, Mask2AnomalyConfig, exist_ok=True)
AutoModel.register(Mask2AnomalyConfig, Mask2AnomalyModel, exist_ok=True)
AutoModelForUniversalSegmentation.register(Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation, exist_ok=True)
AutoModelForImageSegmentation.register(Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation, exist_ok=True)

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_REFINE_CLASS_IDS",
    "Mask2AnomalyConfig",
    "Mask2AnomalyForUniversalSegmentation",
    "Mask2AnomalyModel",
    "Mask2AnomalyPreTrainedModel",
    "class_mask_scores",
    "mask_contrastive_loss",
]
