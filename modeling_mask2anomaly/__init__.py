"""Mask2Anomaly (ICCV 2023) for transformers.

Importing this package registers the model with transformers' Auto classes: `AutoConfig`, `AutoModel` (the
base model), `AutoModelForUniversalSegmentation`, `AutoModelForImageSegmentation` (for the pipeline) and,
`AutoImageProcessor`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageSegmentation,
    AutoModelForUniversalSegmentation,
)

from .configuration_mask2anomaly import (
    ANOMALY_SCORERS,
    CITYSCAPES_CLASSES,
    CITYSCAPES_REFINE_CLASS_IDS,
    OUTLIER_LABEL,
    Mask2AnomalyConfig,
)
from .image_processing_mask2anomaly import (
    IMAGE_EXTENSIONS,
    AnomalySemanticOutput,
    Mask2AnomalyImageProcessor,
    load_image,
)
from .modeling_mask2anomaly import (
    Mask2AnomalyForUniversalSegmentation,
    Mask2AnomalyModel,
    Mask2AnomalyPreTrainedModel,
    class_mask_scores,
    mask_contrastive_loss,
)
from .scorers import SCORERS, Scorer
from .inference import (  # noqa: E402  (after the model classes it loads)
    AnomalyPrediction,
    batches_of_equal_size,
    iter_predict_anomaly,
    load_model_and_processor,
    predict_anomaly,
    resolve_device,
)

AutoConfig.register(Mask2AnomalyConfig.model_type, Mask2AnomalyConfig, exist_ok=True)
AutoModel.register(Mask2AnomalyConfig, Mask2AnomalyModel, exist_ok=True)
AutoModelForUniversalSegmentation.register(Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation, exist_ok=True)
AutoModelForImageSegmentation.register(Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation, exist_ok=True)
AutoImageProcessor.register(Mask2AnomalyConfig, image_processor_classes={"pil": Mask2AnomalyImageProcessor}, exist_ok=True)
# Every class that travels to the Hub registers with its Auto class: its save_pretrained then writes the
# `auto_map` entry and copies its module, and every module that imports relatively, through transformers'
# `custom_object_save`, so a saved folder loads with trust_remote_code=True where this package is not installed.
# (The pipelines travel through the model's `custom_pipelines`; see `remote_code` for the sync command.)
Mask2AnomalyConfig.register_for_auto_class("AutoConfig")
Mask2AnomalyModel.register_for_auto_class("AutoModel")
Mask2AnomalyForUniversalSegmentation.register_for_auto_class("AutoModelForUniversalSegmentation")
Mask2AnomalyImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "ANOMALY_SCORERS",
    "AnomalyPrediction",
    "AnomalySemanticOutput",
    "IMAGE_EXTENSIONS",
    "SCORERS",
    "Scorer",
    "batches_of_equal_size",
    "load_model_and_processor",
    "resolve_device",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_REFINE_CLASS_IDS",
    "Mask2AnomalyConfig",
    "OUTLIER_LABEL",
    "Mask2AnomalyForUniversalSegmentation",
    "Mask2AnomalyImageProcessor",
    "Mask2AnomalyModel",
    "Mask2AnomalyPreTrainedModel",
    "class_mask_scores",
    "iter_predict_anomaly",
    "load_image",
    "mask_contrastive_loss",
    "predict_anomaly",
]
