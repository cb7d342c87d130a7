"""Convert the authors' detectron2 Mask2Anomaly checkpoints into transformers model folders.

`mask2anomaly-convert --checkpoint CKPT --config CONFIG.yaml --output-dir DIR` reads an official checkpoint
(`.pth` written by detectron2's checkpointer, `{"model": state_dict, ...}` or a bare state dict, or a
detectron2 `.pkl` of numpy arrays) and its detectron2 YAML config, and writes a folder that loads with
`Mask2AnomalyForUniversalSegmentation.from_pretrained` and can be pushed to the Hub as it is: `config.json`,
`model.safetensors`, `preprocessor_config.json` (the official test-time pre-processing) and the remote-code
files.

Every checkpoint key is either mapped onto a key of the transformers model or dropped on purpose (the unused
GMA `fusion_layer`, the criterion's `empty_weight` (rebuilt from the config), Swin's deterministic
`relative_position_index`, BatchNorm `num_batches_tracked` the model has no slot for), and every model key
is filled (from the checkpoint, or, for buffers that carry no learned value, from their definition); any
other key, or any shape mismatch, is an error naming the keys. Checkpoints are read with
`torch.load(weights_only=True)` or, for `.pkl`, with an unpickler that only rebuilds numpy arrays: nothing
in a checkpoint can run code.

One module per step:

- `backbone`: the backbone's starting weights (Barlow Twins / torchvision / detectron2 ResNet layouts;
  `mask2anomaly-backbone`);
- `checkpoint`: reading checkpoints (`load_official_state_dict`);
- `detectron2_config`: reading detectron2 YAML configs safely (`config_from_detectron2_yaml`, test-time
  pre-processing);
- `key_rules`: where each official key lands;
- `state_dict`: the mapping itself (`convert_state_dict`, `target_specs`);
- `writing`: the model folder (`convert_checkpoint`, `save_image_processor`);
- `cli`: `mask2anomaly-convert`.

Starting a Mask2Anomaly from a transformers Mask2Former (stage-2 fine-tuning) is the model's own
`Mask2AnomalyForUniversalSegmentation.from_mask2former`.
"""

from __future__ import annotations

from ..modeling_mask2anomaly import (
    mask2anomaly_config_from_mask2former,
    mask2former_config_from_mask2anomaly,
)
from .checkpoint import load_official_state_dict
from .cli import main
from .detectron2_config import (
    STREETHAZARDS_CLASSES,
    Detectron2Config,
    Detectron2ConfigError,
    TestTimePreprocessing,
    UnevaluatedTag,
    backbone_kind,
    config_from_detectron2,
    config_from_detectron2_yaml,
    load_detectron2_yaml,
    preprocessing_from_detectron2,
)
from .errors import ConversionError
from .state_dict import TargetSpec, convert_state_dict, target_specs
from .writing import convert_checkpoint, save_image_processor

__all__ = [
    "STREETHAZARDS_CLASSES",
    "ConversionError",
    "Detectron2Config",
    "Detectron2ConfigError",
    "TargetSpec",
    "TestTimePreprocessing",
    "UnevaluatedTag",
    "backbone_kind",
    "config_from_detectron2",
    "config_from_detectron2_yaml",
    "convert_checkpoint",
    "convert_state_dict",
    "load_detectron2_yaml",
    "load_official_state_dict",
    "main",
    "mask2anomaly_config_from_mask2former",
    "mask2former_config_from_mask2anomaly",
    "preprocessing_from_detectron2",
    "save_image_processor",
    "target_specs",
]
