"""The training configuration: typed settings (dataclasses), YAML files and ``key.sub=value`` overrides.

A recipe is a `TrainingConfig` (model, processor, data, run settings, the two stages). `load_config` reads a
YAML file (a path, or a packaged config: ``cityscapes`` with the official hyper-parameters, ``synthroad`` for
CPU runs) and applies command-line overrides, through OmegaConf structured configs: OmegaConf checks every
key against the dataclasses, converts and validates values against their annotations (YAML 1.1 reads
``1e-4`` as a string; a float field converts it) and parses nothing by hand.

Why OmegaConf and not transformers' `HfArgumentParser`: `HfArgumentParser` maps flat dataclasses to
``--flag`` arguments; a recipe here is nested (``data.validation.anomaly.num``, free-form source specs and
`Mask2AnomalyConfig` overrides under `model.config`), which is what OmegaConf's structured configs and dotted
overrides are made for.

Semantics (the same for keys of the YAML file and for overrides):

- ``stage1.max_steps=100`` sets one typed field; ``data.train.num=500`` sets one key of a free-form mapping
  (`model.config`, `processor`, the source specs of `data`); ``data.train={source: folder, root: d}`` or
  ``model.config={}`` replaces the mapping as a whole. Values are parsed as YAML.
- A source spec (`data.train`, `data.outliers`, `data.validation.NAME`) whose ``source`` an override changes
  keeps only the arguments that overrides give: ``data.train.source=folder data.train.root=data/synthroad/train``
  reads that folder instead of passing the file's SynthRoad arguments (``num``, ``seed``...) to the folder
  reader. Overriding ``source`` with its current value keeps the file's arguments.
- A wrong key or value is one `ValueError` line naming it (and, for a key, the valid keys there).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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
    validation: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # a null split is skipped
    crop_size: list[int] = field(default_factory=lambda: [128, 256])
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    hflip: bool = True
    color_jitter: bool = True
    outlier_probability: float = 0.2
    num_workers: int = 2
    # read every training image and label once before step 1 (sizes, truncated files, label values), naming a bad file
    check_data: bool = True


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
    # Overrides of a second stage-1 command started from the first one's output (`--init-from`); the recipe's
    # stage 1 is then that second run. One `mask2anomaly-train` command runs one stage and ignores this; the tools
    # that run a whole recipe (`eval/ablation.py`) read it. Empty: stage 1 is a single command.
    stage1_continuation: list[str] = field(default_factory=list)

    def stage(self, stage: int) -> StageSettings:
        """Settings of stage 1 or 2."""
        if stage not in (1, 2):
            raise ValueError(f"stage={stage!r}: expected 1 (closed set) or 2 (outlier exposure)")
        return self.stage1 if stage == 1 else self.stage2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Source specs: mappings `{source: NAME, **arguments of its reader}` (see `sources.load_source`).
SOURCE_SPEC_PATHS = ("data.train", "data.outliers")
SOURCE_SPEC_GROUPS = ("data.validation",)  # mappings of name -> source spec
_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_0-9][\w-]*)*=", re.ASCII)


def is_override(argument: str) -> bool:
    """Whether a command-line word is a ``dotted.key=value`` override (not a path or a flag)."""
    return bool(_OVERRIDE.match(argument))


def parse_override(override: str) -> tuple[str, Any]:
    """``"dotted.key=value"`` -> (``"dotted.key"``, value parsed as YAML; an empty value is null)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ValueError(f"override {override!r} is not of the form dotted.key=value (e.g. stage1.max_steps=100)")
    try:
        return key, (yaml.safe_load(raw) if raw != "" else None)
    except yaml.YAMLError as error:
        problem = str(error).splitlines()[0]
        raise ValueError(f"override {override!r}: the value is not valid YAML ({problem})") from None


def _source_spec_of(key: str) -> str | None:
    """The source spec a ``....source`` key sets (``data.train.source`` -> ``data.train``), else None."""
    spec, _, leaf = key.rpartition(".")
    if leaf != "source":
        return None
    if spec in SOURCE_SPEC_PATHS or spec.rpartition(".")[0] in SOURCE_SPEC_GROUPS:
        return spec
    return None


def _one_line(error: OmegaConfBaseException, node: DictConfig, key: str, value: Any) -> str:
    """OmegaConf's multi-line message as one line naming the key, and the valid keys for an unknown one."""
    full_key = getattr(error, "full_key", None) or key
    message = str(error).splitlines()[0]
    if isinstance(error, (AttributeError, KeyError)):
        parent = full_key.rpartition(".")[0]
        holder = OmegaConf.select(node, parent) if parent else node
        valid = ", ".join(str(k) for k in holder.keys()) if isinstance(holder, DictConfig) else "none"
        return f"unknown config key {full_key!r}; valid keys{' of ' + parent if parent else ''}: {valid}"
    return f"{full_key}={value!r}: {message}"


def _assign(node: DictConfig, key: str, value: Any) -> None:
    """Set `key` of `node` to `value`: typed sections (dataclasses) are entered key by key, anything else
    (a field, a free-form mapping, a list) is replaced."""
    target = OmegaConf.select(node, key, throw_on_missing=False) if key else node
    section = isinstance(target, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(target))
    try:
        if section and isinstance(value, Mapping):
            for name, item in value.items():
                _assign(node, f"{key}.{name}" if key else str(name), item)
            return
        if section:
            raise ValueError(f"{key}={value!r}: expected a mapping of its settings")
        OmegaConf.update(node, key, value, merge=False)
    except OmegaConfBaseException as error:
        raise ValueError(_one_line(error, node, key, value)) from None


def build_config(values: Mapping[str, Any], overrides: Sequence[str] = ()) -> TrainingConfig:
    """A `TrainingConfig` from the mapping of a YAML file and ``dotted.key=value`` overrides (see the module)."""
    node = OmegaConf.structured(TrainingConfig)
    _assign(node, "", dict(values))
    parsed = [parse_override(override) for override in overrides]
    for key, value in parsed:
        spec = _source_spec_of(key)
        if spec is not None and OmegaConf.select(node, key, default=None) != value:
            _assign(node, spec, {})  # the file's arguments belong to the file's source
    for key, value in parsed:
        _assign(node, key, value)
    return OmegaConf.to_object(node)


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
        try:
            values = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    try:
        file_config = build_config(values)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return build_config(dataclasses.asdict(file_config), overrides) if overrides else file_config
