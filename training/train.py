"""The accelerate training script of Mask2Anomaly: stage 1 (closed set) and stage 2 (outlier exposure).

    mask2anomaly-train --config synthroad --stage 1 --output-dir runs/stage1
    mask2anomaly-train --config synthroad --stage 2 --init-from runs/stage1 --output-dir runs/stage2
    accelerate launch --multi_gpu --num_processes 2 -m mask2anomaly_training.train --config synthroad ...

(On a machine without GPUs the same `accelerate launch --multi_gpu` line runs the processes on the CPU with a
gloo process group; `accelerate launch --cpu --num_processes N` starts a single process unless MPI is set up.)

- **Stage 1** trains with the Mask2Former losses only (no outliers, no contrastive loss).
- **Stage 2** pastes outlier objects into the training images (probability `data.outlier_probability`, label
  254), passes `outlier_labels` so that the model adds its mask contrastive loss, and freezes the backbone.

Configs are YAML files (packaged ones: ``cityscapes`` with the official hyper-parameters, ``synthroad`` for CPU
runs); ``KEY=VALUE`` arguments override any entry (``stage1.max_steps=200 data.train.num=500``). The optimiser
is AdamW with a learning-rate multiplier on the backbone and no weight decay on norm and embedding parameters
(detectron2's Mask2Former optimiser), the schedule is poly, gradients are clipped on their norm over the full
model, and `batch_size` is the number of images per optimizer step over all processes and accumulation steps,
so a run gives the same batches whatever the number of processes.

Exact resumption: batches are drawn by a sampler that is a pure function of (seed, epoch, step), every
augmentation draws from a generator seeded by (seed, epoch, image index) (`transforms.sample_rng`), the data loader's workers do
not touch the global random state, and checkpoints (`accelerator.save_state`: weights, optimizer, scheduler,
step, every random generator) are written to a temporary folder that is renamed when complete. A run killed at
any point and restarted with ``--resume`` therefore continues exactly as if it had never stopped.

The output folder is a `save_pretrained` model folder with its image processor, `training_config.yaml` (the
resolved configuration and command) and `eval_results.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import inspect
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation
from modeling_mask2anomaly.configuration_mask2anomaly import resnet_backbone
from modeling_mask2anomaly.image_processing_mask2anomaly import Mask2AnomalyImageProcessor

from .collate import TrainingCollator

logger = get_logger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CHECKPOINT_PREFIX = "checkpoint-"
TMP_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
TRAINING_CONFIG_NAME = "training_config.yaml"
EVAL_RESULTS_NAME = "eval_results.json"


# ======================================================================================================
# Configuration
# ======================================================================================================
@dataclass
class ModelSettings:
    """Which model to build when training from scratch."""

    # "paper" (ResNet-50, the released architecture) or "tiny" (`Mask2AnomalyConfig.tiny`), then `config`.
    preset: str = "tiny"
    # `Mask2AnomalyConfig` keyword overrides; `backbone_config` may be a dict of `ResNetConfig` arguments.
    config: dict[str, Any] = field(default_factory=dict)
    # State dict (.safetensors, .pt, .bin) of the backbone in transformers' ResNet naming, loaded before stage 1.
    backbone_checkpoint: str | None = None


@dataclass
class DataSettings:
    """Data sources and augmentation. A source is a dict `{source: NAME, **arguments of its reader}`."""

    train: dict[str, Any] = field(default_factory=lambda: {"source": "synthroad", "split": "train", "num": 64})
    outliers: dict[str, Any] | None = None
    validation: dict[str, dict[str, Any]] = field(default_factory=dict)
    crop_size: list[int] = field(default_factory=lambda: [128, 256])
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    hflip: bool = True
    color_jitter: bool = True
    outlier_probability: float = 0.2
    num_workers: int = 2


@dataclass
class RunSettings:
    """Everything about a run that is not an optimisation hyper-parameter."""

    seed: int = 0
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16
    report_to: str = "auto"  # auto | tensorboard | none
    logging_steps: int = 20
    checkpoint_steps: int = 500
    save_total_limit: int = 2
    eval_steps: int = 0  # 0: evaluate only at the end
    eval_max_images: int | None = None
    eval_scorer: str = "mask2anomaly"
    eval_flip_tta: bool = False
    eval_refine: bool = True
    eval_batch_size: int = 4


@dataclass
class StageSettings:
    """Optimisation of one stage."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    backbone_lr_multiplier: float = 0.1
    poly_power: float = 0.9
    max_grad_norm: float | None = 0.01
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int = 90000
    freeze_backbone: bool = False
    outlier_exposure: bool = False


@dataclass
class TrainingConfig:
    """A whole training recipe: model, processor, data, run settings and the two stages."""

    model: ModelSettings = field(default_factory=ModelSettings)
    processor: dict[str, Any] = field(default_factory=dict)
    data: DataSettings = field(default_factory=DataSettings)
    training: RunSettings = field(default_factory=RunSettings)
    stage1: StageSettings = field(default_factory=StageSettings)
    stage2: StageSettings = field(
        default_factory=lambda: StageSettings(
            learning_rate=1e-5, batch_size=8, max_steps=5000, freeze_backbone=True, outlier_exposure=True
        )
    )

    def stage(self, stage: int) -> StageSettings:
        """Settings of stage 1 or 2."""
        if stage not in (1, 2):
            raise ValueError(f"stage={stage!r}: expected 1 (closed set) or 2 (outlier exposure)")
        return self.stage1 if stage == 1 else self.stage2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a scalar against its annotation; YAML reads `1e-4` as a string, so numeric strings become floats."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    options = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{where} must not be null")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if option is str and isinstance(value, str):
            return value
        base = typing.get_origin(option) or option
        if base in (dict, list) and isinstance(value, base):
            return copy.deepcopy(value)
    raise ValueError(f"{where}={value!r} is not a valid {annotation}")


def _build(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with the list of valid ones."""
    if values is None:
        return cls()
    if not isinstance(values, Mapping):
        raise ValueError(f"{where or 'config'} must be a mapping; got {values!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ValueError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(f'{where}.{k}' if where else k) for k in unknown)}; valid keys"
            f"{' of ' + where if where else ''}: {', '.join(types_)}"
        )
    kwargs = {}
    for name, annotation in types_.items():
        if name not in values:
            continue
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, values[name], path)
        else:
            kwargs[name] = _coerce(values[name], annotation, path)
    return cls(**kwargs)


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw config mapping, in place."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r} is not of the form dotted.key=value (e.g. stage1.max_steps=100)")
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {override!r}: {part!r} holds {child!r}, not a mapping")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return values


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A config file path, or the packaged config of that name (``cityscapes``, ``synthroad``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = CONFIG_DIR / f"{path.name}.yaml" if path.suffix == "" else CONFIG_DIR / path.name
    if packaged.is_file() and len(path.parts) == 1:
        return packaged
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a file nor a packaged config; "
                            f"packaged configs: {', '.join(available)}")


def load_config(name_or_path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainingConfig:
    """Read a YAML training config (a path or a packaged name) and apply ``dotted.key=value`` overrides."""
    path = resolve_config_path(name_or_path)
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    apply_overrides(values, overrides)
    try:
        return _build(TrainingConfig, values, "")
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


# ======================================================================================================
# Data
# ======================================================================================================
def _road_sources() -> dict[str, Any]:
    from . import data, synthroad

    def folder(root: str, image_dir: str = "images", label_dir: str = "labels"):
        return data.paired_folder_dataset(root, image_dir=image_dir, label_dir=label_dir, label_column="label")

    return {"cityscapes": data.cityscapes_dataset, "synthroad": synthroad.synthroad_dataset, "folder": folder}


def _outlier_sources() -> dict[str, Any]:
    from . import data

    return {"coco": data.coco_outlier_dataset, "synthroad": data.synthroad_outlier_dataset,
            "folder": data.paired_folder_dataset}


def load_source(spec: Mapping[str, Any], outliers: bool = False, where: str = "data"):
    """The `datasets.Dataset` a source spec `{source: NAME, **reader arguments}` names.

    Road sources (``cityscapes``, ``synthroad``, ``folder``) have columns ``image`` and ``label``; outlier
    sources (``coco``, ``synthroad``, ``folder``) have ``image`` and ``mask``.
    """
    sources = _outlier_sources() if outliers else _road_sources()
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


def stage_data(config: TrainingConfig, stage: int) -> tuple[Any, Any, dict[str, Any]]:
    """The augmented training set of `stage` (outliers pasted when the stage uses outlier exposure), its
    `TrainTransform` (see `training_dataset`) and the validation splits."""
    settings = config.stage(stage)
    road = load_source(config.data.train, where="data.train")
    outliers = None
    if settings.outlier_exposure:
        if config.data.outliers is None:
            raise ValueError(f"stage {stage} uses outlier exposure but data.outliers is not set")
        outliers = load_source(config.data.outliers, outliers=True, where="data.outliers")
    dataset, transform = training_dataset(road, make_augmentation(config.data, outliers), config.training.seed)
    return dataset, transform, validation_splits(config.data)


def validation_splits(data: DataSettings) -> dict[str, Any]:
    """The anomaly splits of `data.validation` as datasets (a split set to null, e.g. by an override, is skipped)."""
    return {name: load_source(spec, where=f"data.validation.{name}")
            for name, spec in data.validation.items() if spec is not None}


def _as_array(image: Any, mode: str) -> np.ndarray:
    if hasattr(image, "convert"):
        image = image.convert(mode)
    return np.asarray(image)


def training_dataset(road, augmentation: Any, seed: int) -> tuple[Any, Any]:
    """`road` with a `sample_index` column and the augmentation applied on access, and the applied
    `transforms.TrainTransform` (its generator for each image is a function of (seed, epoch, index) only; call
    its `set_epoch` before creating an epoch's DataLoader)."""
    from .transforms import TrainTransform, add_sample_index

    transform = TrainTransform(augmentation, seed)
    return add_sample_index(road).with_transform(transform), transform


def global_batch_indices(num_samples: int, batch_size: int, seed: int, epoch: int, batch: int) -> list[int]:
    """Indices of global batch `batch` of `epoch`: consecutive slices of a permutation seeded by (seed, epoch).

    The last incomplete batch of an epoch is dropped, so every optimizer step sees `batch_size` images.
    """
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    order = torch.randperm(num_samples, generator=generator)
    return order[batch * batch_size : (batch + 1) * batch_size].tolist()


class ProcessBatchSampler:
    """Micro-batches of one process from global batch `start_batch` of `epoch` to the end of that epoch.

    A global batch of `batch_size` images is split into `num_processes` equal parts and each part into
    `accumulation` micro-batches; this process yields its micro-batches as lists of dataset indices.
    """

    def __init__(self, num_samples: int, batch_size: int, accumulation: int, process_index: int,
                 num_processes: int, seed: int, epoch: int, start_batch: int):
        self.num_samples, self.batch_size, self.accumulation = num_samples, batch_size, accumulation
        self.process_index, self.num_processes = process_index, num_processes
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        self.batches_per_epoch = num_samples // batch_size

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        per_process = self.batch_size // self.num_processes
        micro = per_process // self.accumulation
        for batch in range(self.start_batch, self.batches_per_epoch):
            indices = global_batch_indices(self.num_samples, self.batch_size, self.seed, self.epoch, batch)
            mine = indices[self.process_index * per_process : (self.process_index + 1) * per_process]
            for start in range(0, per_process, micro):
                yield mine[start : start + micro]


def micro_batches(dataset, transform: Any, collator: Any, settings: StageSettings, process_index: int, num_processes: int,
                  seed: int, start_step: int, num_workers: int) -> Iterator[dict[str, Any]]:
    """Endless stream of one process's micro-batches, beginning with those of optimizer step `start_step`.

    `dataset` and `transform` come from `training_dataset`; each epoch gets a fresh DataLoader so that its
    workers see the epoch set on the transform.
    """
    batches_per_epoch = len(dataset) // settings.batch_size
    if batches_per_epoch < 1:
        raise ValueError(f"the training set has {len(dataset)} images, fewer than one batch of {settings.batch_size}")
    epoch, start_batch = divmod(start_step, batches_per_epoch)
    while True:
        transform.set_epoch(epoch)
        sampler = ProcessBatchSampler(len(dataset), settings.batch_size, settings.gradient_accumulation_steps,
                                      process_index, num_processes, seed, epoch, start_batch)
        # The loader's own generator keeps worker seeding off the global torch RNG, whose state is checkpointed.
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(seed), persistent_workers=False,
                            prefetch_factor=4 if num_workers > 0 else None)
        yield from loader
        epoch, start_batch = epoch + 1, 0


def make_augmentation(data: DataSettings, outliers: Any | None):
    """The official training chain of `transforms.py`: [outlier paste], resize, crop, [colour jitter], [flip]."""
    from .transforms import build_train_augmentation

    if len(data.crop_size) != 2 or len(data.scale_range) != 2:
        raise ValueError(f"data.crop_size={data.crop_size} and data.scale_range={data.scale_range}: expected two "
                         f"values each (height, width) and (low, high)")
    return build_train_augmentation(
        crop_size=tuple(data.crop_size), scale_range=tuple(data.scale_range), outlier_source=outliers,
        outlier_probability=data.outlier_probability, color_jitter=data.color_jitter, flip=data.hflip,
    )


# ======================================================================================================
# Model, optimiser, schedule
# ======================================================================================================
# Fields of a stage-1 model's config that stage 2 may change; everything else is architecture.
STAGE2_MUTABLE_CONFIG_KEYS = (
    "contrastive_loss", "contrastive_margin", "contrastive_weight", "class_weight", "mask_weight", "dice_weight",
    "no_object_weight", "train_num_points", "oversample_ratio", "importance_sample_ratio", "use_auxiliary_loss",
    "refine", "refine_score_threshold", "refine_class_ids", "anomaly_scorer", "flip_tta", "anomaly_threshold",
)


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
    """Load a backbone state dict (transformers' ResNet naming, optionally prefixed) into `model`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.backbone_checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "model.pixel_level_module.encoder."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    missing, unexpected = backbone_of(model).load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not a backbone state dict of this model; missing {missing[:5]}..., "
                         f"unexpected {unexpected[:5]}...")


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


_NORM_TYPES = (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm,
               torch.nn.InstanceNorm2d, torch.nn.LocalResponseNorm)


def parameter_groups(model: torch.nn.Module, settings: StageSettings) -> list[dict[str, Any]]:
    """AdamW groups as detectron2's Mask2Former optimiser builds them: backbone lr x `backbone_lr_multiplier`,
    `weight_decay_norm` for norm layers, `weight_decay_embed` for embeddings, `weight_decay` for the rest."""
    backbone = {id(p) for p in backbone_of(model).parameters()}
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if isinstance(module, _NORM_TYPES):
                decay = settings.weight_decay_norm
            elif isinstance(module, torch.nn.Embedding):
                decay = settings.weight_decay_embed
            else:
                decay = settings.weight_decay
            groups.setdefault((id(parameter) in backbone, decay), []).append(parameter)
    return [
        {"params": params, "weight_decay": decay,
         "lr": settings.learning_rate * (settings.backbone_lr_multiplier if in_backbone else 1.0)}
        for (in_backbone, decay), params in groups.items()
    ]


def poly_schedule(optimizer: torch.optim.Optimizer, max_steps: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """detectron2's WarmupPolyLR without warm-up: lr = base_lr * (1 - step / max_steps) ** power."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - min(step, max_steps) / max_steps) ** power
    )


def resolve_mixed_precision(requested: str) -> str:
    """`auto`: fp16 on CUDA (the official AMP); none on CPU, where bf16 autocast brought no speed-up for this model
    (tiny config, 4 x 128x256, one thread: 0.532 s fp32 vs 0.524 s bf16 per step on an AVX-512-BF16 CPU) and
    costs precision. `bf16` can still be asked for explicitly."""
    valid = ("auto", "no", "fp16", "bf16")
    if requested not in valid:
        raise ValueError(f"training.mixed_precision={requested!r} is not one of {', '.join(valid)}")
    if requested != "auto":
        return requested
    return "fp16" if torch.cuda.is_available() else "no"


def resolve_tracker(requested: str) -> str | None:
    valid = ("auto", "tensorboard", "none")
    if requested not in valid:
        raise ValueError(f"training.report_to={requested!r} is not one of {', '.join(valid)}")
    available = any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX"))
    if requested == "tensorboard" and not available:
        raise ImportError("training.report_to=tensorboard needs the tensorboard package")
    if requested == "none" or not available:
        return None
    return "tensorboard"


# ======================================================================================================
# Evaluation
# ======================================================================================================
def evaluate_anomaly(model: torch.nn.Module, processor: Mask2AnomalyImageProcessor, splits: Mapping[str, Any],
                     accelerator: Accelerator | None = None, max_images: int | None = None,
                     scorer: str | None = None, flip_tta: bool = False, refine: bool | None = None,
                     batch_size: int = 4) -> dict[str, float]:
    """AuPRC, FPR95 and AUROC (pooled pixels, void 255 ignored) of each anomaly split `name -> dataset`.

    Images are spread over the processes and the per-process metric accumulators merged, so every process
    returns the same numbers. Keys are ``{name}_auprc``, ``{name}_fpr95`` and ``{name}_auroc``.
    """
    from modeling_mask2anomaly.inference import iter_predict_anomaly

    from mask2anomaly_eval.pixel_metrics import PixelMetricAccumulator

    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    model = accelerator.unwrap_model(model) if accelerator is not None else model
    results: dict[str, float] = {}
    for name, dataset in splits.items():
        count = len(dataset) if max_images is None else min(max_images, len(dataset))
        mine = list(range(rank, count, world))
        metric = PixelMetricAccumulator("exact")
        images = (_as_array(dataset[i]["image"], "RGB") for i in mine)
        predictions = iter_predict_anomaly(model, processor, images, flip_tta=flip_tta, refine=refine,
                                           scorer=scorer, batch_size=batch_size)
        for index, prediction in zip(mine, predictions):
            metric.add(prediction.anomaly_map, _as_array(dataset[index]["label"], "L"))
        if world > 1:
            parts = gather_object([metric])
            metric = parts[0]
            for part in parts[1:]:
                metric = metric.merge(part)
        scores = metric.compute()
        for key in ("auprc", "fpr95", "auroc"):
            results[f"{name}_{key}"] = float(scores[key])
    return results


# ======================================================================================================
# Checkpoints
# ======================================================================================================
@dataclass
class TrainingProgress:
    """Counters saved with every checkpoint (`accelerator.register_for_checkpointing`)."""

    step: int = 0
    stage: int = 1
    max_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, copy.deepcopy(value))


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `checkpoint_dir`, oldest first (temporary folders of interrupted saves excluded)."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed to ``checkpoint-<step>`` once every process has
    written its part, so a checkpoint folder is always complete; keeps the newest `keep` checkpoints."""
    directory = Path(checkpoint_dir)
    final = directory / checkpoint_name(step)
    temporary = directory / f"{TMP_CHECKPOINT_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``latest`` = newest complete one in `checkpoint_dir` (None if there is none)."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX)):
        raise FileNotFoundError(f"--resume {resume!r} is not a checkpoint folder ({CHECKPOINT_PREFIX}<step>)")
    return path


# ======================================================================================================
# Training
# ======================================================================================================
def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: [t.to(device) for t in value] if isinstance(value, list) else value.to(device)
            for key, value in batch.items()}


def _scalar_losses(outputs: Any) -> dict[str, float]:
    """The loss and its final-layer terms (auxiliary terms carry an `_<i>` suffix and are summed into `loss`)."""
    values = {"loss": float(outputs.loss.detach())}
    for key, value in (outputs.loss_dict or {}).items():
        if not key.rsplit("_", 1)[-1].isdigit():
            values[key] = float(value.detach())
    return values


def optimizer_step(model: torch.nn.Module, batches: Sequence[Mapping[str, Any]], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, accelerator: Accelerator,
                   max_grad_norm: float | None) -> dict[str, float]:
    """One optimizer step over the accumulated micro-`batches` (model inputs on the right device).

    Gradients are synchronised across processes only on the last micro-batch, clipped on their norm over the
    whole model (detectron2's "full_model" clipping), and the schedule advances unless mixed precision skipped
    the step. Returns the loss and its final-layer terms, averaged over the micro-batches of this process.
    """
    losses: dict[str, float] = {}
    for index, batch in enumerate(batches):
        sync = contextlib.nullcontext() if index == len(batches) - 1 else accelerator.no_sync(model)
        with sync:
            outputs = model(**batch)
            accelerator.backward(outputs.loss / len(batches))
        for key, value in _scalar_losses(outputs).items():
            losses[key] = losses.get(key, 0.0) + value / len(batches)
    if max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return losses


def synchronise_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Give every process the main process's buffers (BatchNorm running statistics).

    DDP broadcasts buffers from process 0 at the start of each training forward, but every process then updates
    its own copy in that forward; without this, processes would evaluate (and process 0 would save) slightly
    different models.
    """
    if accelerator.num_processes > 1:
        for buffer in accelerator.unwrap_model(model).buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def _launched_on_cpu_only() -> bool:
    """True for a multi-process launch (torchrun, `accelerate launch --multi_gpu`) on a machine without an
    accelerator: accelerate then needs `cpu=True` to set up its gloo process group (MULTI_CPU) instead of
    running every process as an independent single-process job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def train(config: TrainingConfig, output_dir: str | os.PathLike, stage: int = 1, max_steps: int | None = None,
          resume: str | None = None, init_from: str | None = None, checkpoint_dir: str | os.PathLike | None = None,
          command: str | None = None) -> dict[str, Any]:
    """Train stage `stage` of `config`; write the model folder to `output_dir` and return the final metrics.

    Args:
        config: the recipe (see `load_config`).
        output_dir: receives the `save_pretrained` model and image processor, `training_config.yaml` and
            `eval_results.json`.
        stage: 1 (closed set) or 2 (outlier exposure, backbone frozen).
        max_steps: optimizer steps (and poly-schedule length); default the stage's `max_steps`.
        resume: ``"latest"`` (newest complete checkpoint in `checkpoint_dir`, or a fresh start when there is
            none) or a checkpoint folder.
        init_from: a model folder (a stage-1 `output_dir`) to start from; stage 2 normally needs one.
        checkpoint_dir: where checkpoints go; default ``output_dir/checkpoints``.
        command: the command line, recorded in `training_config.yaml`.
    """
    settings = copy.deepcopy(config.stage(stage))
    if max_steps is not None:
        settings.max_steps = int(max_steps)
    if settings.max_steps < 1:
        raise ValueError(f"max_steps={settings.max_steps}: expected at least 1")
    run = config.training
    output_dir = Path(output_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else output_dir / "checkpoints"
    tracker = resolve_tracker(run.report_to)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(run.mixed_precision), log_with=tracker,
                              project_dir=str(output_dir), cpu=_launched_on_cpu_only())
    per_process, remainder = divmod(settings.batch_size, accelerator.num_processes * settings.gradient_accumulation_steps)
    if remainder or per_process < 1:
        raise ValueError(
            f"stage{stage}.batch_size={settings.batch_size} must be a positive multiple of num_processes "
            f"({accelerator.num_processes}) x gradient_accumulation_steps ({settings.gradient_accumulation_steps})"
        )
    if stage == 2 and init_from is None:
        logger.warning("stage 2 without --init-from trains the outlier-exposure stage from a fresh model", main_process_only=True)

    # Same initial weights on every process (DDP would broadcast them anyway; this also makes runs repeatable).
    set_seed(run.seed)
    model, processor = build_model(config, init_from)
    if settings.freeze_backbone:
        freeze_backbone(model)

    with accelerator.main_process_first():  # the first process builds the `datasets` caches, the others reuse them
        dataset, transform, validation = stage_data(config, stage)

    optimizer = torch.optim.AdamW(parameter_groups(model, settings), lr=settings.learning_rate)
    scheduler = poly_schedule(optimizer, settings.max_steps, settings.poly_power)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is not prepared: accelerate would step it once per process. It is checkpointed as is.
    progress = TrainingProgress(stage=stage, max_steps=settings.max_steps)
    accelerator.register_for_checkpointing(scheduler, progress)

    start = resolve_resume(resume, checkpoint_dir)
    if start is not None:
        accelerator.load_state(str(start))
        if progress.stage != stage or progress.max_steps != settings.max_steps:
            raise ValueError(f"checkpoint {start} belongs to stage {progress.stage} with max_steps "
                             f"{progress.max_steps}; this run is stage {stage} with max_steps {settings.max_steps}")
        logger.info(f"resumed from {start} at step {progress.step}", main_process_only=True)
    elif resume == "latest":
        logger.info(f"no checkpoint in {checkpoint_dir}; starting from step 0", main_process_only=True)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        record = {"command": command, "stage": stage, "max_steps": settings.max_steps, "init_from": init_from,
                  "num_processes": accelerator.num_processes, "config": config.to_dict()}
        with open(output_dir / TRAINING_CONFIG_NAME, "w", encoding="utf-8") as handle:
            yaml.safe_dump(record, handle, sort_keys=False)
    if tracker is not None:
        accelerator.init_trackers(f"mask2anomaly-stage{stage}", config={"max_steps": settings.max_steps,
                                  "learning_rate": settings.learning_rate, "batch_size": settings.batch_size})

    def run_evaluation() -> dict[str, float]:
        if not validation:
            return {}
        synchronise_buffers(accelerator, model)
        scores = evaluate_anomaly(model, processor, validation, accelerator, run.eval_max_images, run.eval_scorer,
                                  run.eval_flip_tta, run.eval_refine, run.eval_batch_size)
        set_train_mode(model, settings.freeze_backbone)
        return scores

    collator = TrainingCollator(processor, outlier_labels=settings.outlier_exposure)
    stream = micro_batches(dataset, transform, collator, settings, accelerator.process_index,
                           accelerator.num_processes, run.seed, progress.step, config.data.num_workers)
    set_train_mode(model, settings.freeze_backbone)
    window: dict[str, float] = {}
    window_steps, window_start = 0, time.perf_counter()
    bar = _progress_bar(accelerator, progress.step, settings.max_steps, stage)
    accumulation = settings.gradient_accumulation_steps
    while progress.step < settings.max_steps:
        batches = [_to_device(next(stream), accelerator.device) for _ in range(accumulation)]
        for key, value in optimizer_step(model, batches, optimizer, scheduler, accelerator,
                                         settings.max_grad_norm).items():
            window[key] = window.get(key, 0.0) + value
        progress.step += 1
        window_steps += 1
        bar.update(1)

        log: dict[str, float] = {}
        if progress.step % run.logging_steps == 0 or progress.step == settings.max_steps:
            means = torch.tensor([window[k] / window_steps for k in sorted(window)], device=accelerator.device)
            means = accelerator.reduce(means, reduction="mean")
            log = dict(zip(sorted(window), means.tolist()))
            log["lr"] = max(scheduler.get_last_lr())  # the head's rate (the backbone runs at a fraction)
            log["seconds_per_step"] = (time.perf_counter() - window_start) / window_steps
            window, window_steps, window_start = {}, 0, time.perf_counter()
            bar.set_postfix(loss=f"{log['loss']:.3f}")
        if run.eval_steps and progress.step % run.eval_steps == 0 and progress.step < settings.max_steps:
            log.update(run_evaluation())
        if log:
            log["step"] = progress.step
            progress.history.append(log)
            accelerator.log(log, step=progress.step)
            logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in log.items()),
                        main_process_only=True)
        if run.checkpoint_steps and progress.step % run.checkpoint_steps == 0:
            save_checkpoint(accelerator, checkpoint_dir, progress.step, run.save_total_limit)
    bar.close()

    final = run_evaluation()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        with open(output_dir / EVAL_RESULTS_NAME, "w", encoding="utf-8") as handle:
            json.dump({"stage": stage, "step": progress.step, "final": final, "history": progress.history},
                      handle, indent=2)
        logger.info(f"wrote the model to {output_dir}" + (f"; {final}" if final else ""), main_process_only=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _progress_bar(accelerator: Accelerator, start: int, total: int, stage: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"stage {stage}", unit="step",
                disable=not accelerator.is_local_main_process, dynamic_ncols=True)


# ======================================================================================================
# Command line
# ======================================================================================================
def build_parser(prog: str = "mask2anomaly-train", description: str | None = None,
                 checkpoint_dir: bool = True) -> argparse.ArgumentParser:
    """The command line of `mask2anomaly-train` (also used by the Trainer route, without ``--checkpoint-dir``)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (
            "Train Mask2Anomaly: stage 1 (closed set) or stage 2 (outlier exposure). Also runs under "
            "`accelerate launch -m mask2anomaly_training.train` for several processes."),
    )
    parser.add_argument("--config", default="synthroad",
                        help="YAML config file or packaged config name (cityscapes, synthroad); default synthroad")
    parser.add_argument("--output-dir", required=True, help="folder for the trained model (save_pretrained)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1, help="1: closed set; 2: outlier exposure")
    parser.add_argument("--init-from", default=None, help="model folder to start from (stage 2: the stage-1 output)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the stage's max_steps)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the newest checkpoint (or from the given checkpoint folder)")
    if checkpoint_dir:
        parser.add_argument("--checkpoint-dir", default=None,
                            help="where checkpoints go (default OUTPUT_DIR/checkpoints)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. stage1.learning_rate=2e-4 data.train.num=500")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mask2anomaly-train`."""
    from transformers.utils import logging as hf_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    hf_logging.set_verbosity_warning()
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    command = " ".join(["mask2anomaly-train", *(sys.argv[1:] if argv is None else argv)])
    train(config, args.output_dir, stage=args.stage, max_steps=args.max_steps, resume=args.resume,
          init_from=args.init_from, checkpoint_dir=args.checkpoint_dir, command=command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
