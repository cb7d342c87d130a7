"""Convert an official checkpoint and its detectron2 YAML into a complete transformers model folder, written
beside its destination and moved into place only when complete."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
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
    """Write `preprocessor_config.json`: the official test-time resize, normalisation, padding and refinement rule
    (the other post-processing settings keep the processor's defaults: flip TTA, the paper's scorer)."""
    processor = Mask2AnomalyImageProcessor.from_model_config(
        config,
        refine=preprocessing.refine,
        refine_class_ids=list(preprocessing.refine_class_ids),
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


def check_replaceable(output_dir: Path, overwrite: bool) -> None:
    """ConversionError unless `output_dir` may be written: it does not exist, or `overwrite` is given and it is an
    empty folder or a Mask2Anomaly model folder (a config.json whose model_type is ``mask2anomaly``). `--overwrite`
    never deletes a folder of anything else (a home folder, a dataset) by mistake."""
    if not output_dir.exists() and not output_dir.is_symlink():
        return
    if not overwrite:
        raise ConversionError(f"{output_dir} already exists; pass --overwrite to replace it")
    if output_dir.is_symlink() or not output_dir.is_dir():
        raise ConversionError(f"{output_dir} is not a folder; --overwrite only replaces a Mask2Anomaly model folder")
    if not any(output_dir.iterdir()):
        return
    try:
        model_type = json.loads((output_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type != Mask2AnomalyConfig.model_type:
        raise ConversionError(f"{output_dir} is not a Mask2Anomaly model folder (no config.json with model_type "
                              f"{Mask2AnomalyConfig.model_type!r}); --overwrite replaces only those, so nothing was "
                              f"deleted: choose another --output-dir")


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a file system without it
        return False
    raise OSError(error, os.strerror(error), os.fspath(second))


def _publish(staging: Path, output_dir: Path, overwrite: bool) -> None:
    """Move a finished staging folder to `output_dir`; an existing folder is replaced only with `overwrite` (and
    only a model folder, see `check_replaceable`), and only once the new one is complete. The replacement swaps
    the two folders atomically where the system can (there is always a complete `output_dir`), else renames the
    old one away first; the old one is deleted last."""
    check_replaceable(output_dir, overwrite)
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return
    if _exchange(staging, output_dir):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the old folder
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
    os.replace(output_dir, retired / output_dir.name)
    os.replace(staging, output_dir)
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
    check_replaceable(output_dir, overwrite)
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
