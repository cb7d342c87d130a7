"""Convert an official checkpoint and its detectron2 YAML into a complete transformers model folder, written
beside its destination and moved into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging

from ..configuration_mask2anomaly import Mask2AnomalyConfig
from ..image_processing_mask2anomaly import Mask2AnomalyImageProcessor
from ..modeling_mask2anomaly import Mask2AnomalyForUniversalSegmentation
from .checkpoint import load_official_state_dict
from .detectron2_config import (
    Detectron2Config,
    TestTimePreprocessing,
    backbone_kind,
    config_from_detectron2,
    preprocessing_from_detectron2,
)
from .errors import ConversionError
from .state_dict import convert_state_dict, target_specs

logger = logging.get_logger(__name__)


def _empty_model(config: Mask2AnomalyConfig) -> Mask2AnomalyForUniversalSegmentation:
    # Built on the meta device: no memory and no random initialisation, the weights come from the checkpoint.
    with torch.device("meta"):
        return Mask2AnomalyForUniversalSegmentation(config)


def save_image_processor(
    preprocessing: TestTimePreprocessing, config: Mask2AnomalyConfig, directory: str | os.PathLike
) -> None:
    """Write `preprocessor_config.json`: the official test-time resize, normalisation and padding, and the
    model's post-processing settings (refinement, flip TTA, ...)."""
    processor = Mask2AnomalyImageProcessor.from_model_config(
        config,
        size={"shortest_edge": preprocessing.shortest_edge, "longest_edge": preprocessing.longest_edge},
        # the processor rescales by 1/255 before normalising, so the 0..255 statistics are divided by 255
        image_mean=[v / 255.0 for v in preprocessing.image_mean],
        image_std=[v / 255.0 for v in preprocessing.image_std],
        size_divisor=preprocessing.size_divisibility,
    )
    processor.save_pretrained(directory)


def _use_default_permissions(folder: Path) -> None:
    # mkdtemp (and the temporary files behind safetensors) are private (0700 / 0600); a model folder is meant
    # to be shared, so give it the permissions a plain mkdir / open would have under the current umask.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _publish(staging: Path, output_dir: Path, overwrite: bool) -> None:
    """Move a finished staging folder to `output_dir`; an existing folder is replaced only with `overwrite`,
    and only once the new one is complete."""
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"{output_dir} already exists; pass --overwrite to replace it")
    retired = None
    if output_dir.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        os.replace(output_dir, retired / output_dir.name)
    os.replace(staging, output_dir)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def convert_checkpoint(
    checkpoint_path: str | os.PathLike,
    config_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Convert an official checkpoint + detectron2 YAML into a transformers model folder at `output_dir`.

    The folder is assembled next to `output_dir` and moved into place only when complete, so a failure never
    leaves a half-written folder. Returns `output_dir`.
    """
    output_dir = Path(output_dir).expanduser().resolve()
    d2_cfg = Detectron2Config.from_file(config_path)
    config = config_from_detectron2(d2_cfg)
    preprocessing = preprocessing_from_detectron2(d2_cfg)
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"{output_dir} already exists; pass --overwrite to replace it")
    source = load_official_state_dict(checkpoint_path)
    model = _empty_model(config)
    converted = convert_state_dict(source, target_specs(model), config, input_is_bgr=preprocessing.input_is_bgr)
    model.load_state_dict(converted, strict=True, assign=True)
    model.eval()

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        save_image_processor(preprocessing, config, staging)
        _use_default_permissions(staging)
        _publish(staging, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(f"wrote {output_dir} ({backbone_kind(d2_cfg)} backbone, {config.num_labels} classes)")
    return output_dir



__all__ = ["convert_checkpoint", "save_image_processor"]
