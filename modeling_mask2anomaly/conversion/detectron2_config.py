"""Read the authors' detectron2 YAML configs and turn them into a `Mask2AnomalyConfig` and test-time
pre-processing settings.

The official configs are partial (they rely on detectron2's, DeepLab's and Mask2Former's defaults and on
`_BASE_` inheritance), and their Cityscapes / StreetHazards base files hold a
`!!python/object/apply:eval` tag that detectron2 evaluates with an unsafe loader. Here every file is parsed
with a `yaml.SafeLoader` subclass that keeps unknown tags as inert `UnevaluatedTag` values, `_BASE_` chains
are resolved relative to the including file, and every value the conversion needs falls back to the
upstream default when a file does not set it. Full `cfg.dump()` files (as shipped with the parity fixtures)
and the authors' partial files both work.

Nothing here executes code from a config file.
"""

from __future__ import annotations

import ast
import copy
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import ResNetConfig, SwinConfig
from transformers.utils import logging

from ..configuration_mask2anomaly import CITYSCAPES_CLASSES, CITYSCAPES_REFINE_CLASS_IDS, Mask2AnomalyConfig

logger = logging.get_logger(__name__)

# The 12 training classes of the authors' StreetHazards registration (`register_street_hazard.py`), in
# train-id order; their 13th entry, "void", is the ignore label 12.
STREETHAZARDS_CLASSES: tuple[str, ...] = (
    "background",
    "building",
    "fence",
    "pedestrian",
    "pole",
    "road line",
    "road",
    "sidewalk",
    "vegetation",
    "car",
    "wall",
    "traffic sign",
)

# ResNet depth -> blocks per stage (res2..res5) for the bottleneck ResNets detectron2 builds.
RESNET_STAGE_BLOCKS: dict[int, list[int]] = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}

# BatchNorm flavours that all compute the same thing in eval mode (running statistics, eps 1e-5).
BATCHNORM_NORMS = ("BN", "FrozenBN", "SyncBN", "nnSyncBN", "naiveSyncBN")

_BACKBONE_OUT_FEATURES = ["res2", "res3", "res4", "res5"]

# detectron2 (`detectron2/config/defaults.py`) + DeepLab (`add_deeplab_config`) + Mask2Former / Mask2Anomaly
# (`add_maskformer2_config`) defaults of every key this module reads, so that partial files resolve the way
# `get_cfg()` + `merge_from_file` would.
DETECTRON2_DEFAULTS: dict[str, Any] = {
    "MODEL": {
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "PIXEL_MEAN": [103.530, 116.280, 123.675],
        "PIXEL_STD": [1.0, 1.0, 1.0],
        "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 2},
        "RESNETS": {
            "DEPTH": 50,
            "OUT_FEATURES": ["res4"],
            "NUM_GROUPS": 1,
            "NORM": "FrozenBN",
            "WIDTH_PER_GROUP": 64,
            "STRIDE_IN_1X1": True,
            "RES4_DILATION": 1,
            "RES5_DILATION": 1,
            "RES2_OUT_CHANNELS": 256,
            "STEM_OUT_CHANNELS": 64,
            "DEFORM_ON_PER_STAGE": [False, False, False, False],
        },
        "SEM_SEG_HEAD": {
            "NAME": "SemSegFPNHead",
            "IN_FEATURES": ["p2", "p3", "p4", "p5"],
            "IGNORE_VALUE": 255,
            "NUM_CLASSES": 54,
            "CONVS_DIM": 128,
            "COMMON_STRIDE": 4,
            "NORM": "GN",
            "MASK_DIM": 256,
            "TRANSFORMER_ENC_LAYERS": 0,
            "PIXEL_DECODER_NAME": "BasePixelDecoder",
            "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res3", "res4", "res5"],
        },
        "MASK_FORMER": {
            "DEEP_SUPERVISION": True,
            "NO_OBJECT_WEIGHT": 0.1,
            "CLASS_WEIGHT": 1.0,
            "DICE_WEIGHT": 1.0,
            "MASK_WEIGHT": 20.0,
            "NHEADS": 8,
            "DROPOUT": 0.1,
            "DIM_FEEDFORWARD": 2048,
            "DEC_LAYERS": 6,
            "PRE_NORM": False,
            "HIDDEN_DIM": 256,
            "NUM_OBJECT_QUERIES": 100,
            "TRANSFORMER_IN_FEATURE": "res5",
            "ENFORCE_INPUT_PROJ": False,
            "SIZE_DIVISIBILITY": 32,
            "TRANSFORMER_DECODER_NAME": "MultiScaleMaskedTransformerDecoder",
            "TRAIN_NUM_POINTS": 112 * 112,
            "OVERSAMPLE_RATIO": 3.0,
            "IMPORTANCE_SAMPLE_RATIO": 0.75,
            "OOD_WEIGHT": 1.0,
            "OOD_LOSS": "margin",
            "MARGIN": 1.0,
        },
        "SWIN": {
            "PRETRAIN_IMG_SIZE": 224,
            "PATCH_SIZE": 4,
            "EMBED_DIM": 96,
            "DEPTHS": [2, 2, 6, 2],
            "NUM_HEADS": [3, 6, 12, 24],
            "WINDOW_SIZE": 7,
            "MLP_RATIO": 4.0,
            "QKV_BIAS": True,
            "QK_SCALE": None,
            "DROP_RATE": 0.0,
            "ATTN_DROP_RATE": 0.0,
            "DROP_PATH_RATE": 0.3,
            "APE": False,
            "PATCH_NORM": True,
            "OUT_FEATURES": ["res2", "res3", "res4", "res5"],
        },
    },
    "INPUT": {"FORMAT": "BGR", "MIN_SIZE_TEST": 800, "MAX_SIZE_TEST": 1333},
    "DATASETS": {"TEST": []},
}

_MISSING = object()


class Detectron2ConfigError(ValueError):
    """A detectron2 config that cannot be read, or describes an architecture this port cannot build."""


@dataclass(frozen=True)
class UnevaluatedTag:
    """A YAML node with a tag the safe loader does not know (e.g. `!!python/object/apply:eval`), kept as data
    and never evaluated."""

    tag: str
    value: Any


class _InertTagLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that turns unknown tags into `UnevaluatedTag` values instead of failing, so that the
    official configs load without running the code their tags name."""


def _construct_unknown_tag(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> UnevaluatedTag:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return UnevaluatedTag(tag=node.tag, value=value)


# A multi-constructor registered for the empty prefix matches every tag that has no constructor of its own.
_InertTagLoader.add_multi_constructor("", _construct_unknown_tag)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """detectron2's merge: mappings merge key by key, everything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


# detectron2 configs nest a few levels (MODEL.SEM_SEG_HEAD.X); anything deeper is refused before it is walked
MAX_YAML_DEPTH = 32


def _nesting_depth(value: Any) -> int:
    """How deeply `value` nests mappings and lists (iteratively: a hostile file cannot exhaust the stack here)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_YAML_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in children)
    return deepest


def load_detectron2_yaml(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Parse a detectron2 YAML file safely and resolve its `_BASE_` chain (relative to the including file,
    `~` expanded), returning the merged mapping without defaults."""
    path = Path(path).expanduser().resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise Detectron2ConfigError(f"_BASE_ cycle in detectron2 configs: {cycle}")
    if not path.is_file():
        raise Detectron2ConfigError(f"detectron2 config {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=_InertTagLoader)  # noqa: S506 - a SafeLoader subclass
        depth = _nesting_depth(data)
    except yaml.YAMLError as error:
        raise Detectron2ConfigError(f"{path} is not valid YAML: {error}") from None
    except RecursionError:
        depth = None
    if depth is None or depth > MAX_YAML_DEPTH:
        raise Detectron2ConfigError(f"{path} nests mappings/lists more than {MAX_YAML_DEPTH} levels deep; a "
                                    f"detectron2 config needs a handful")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise Detectron2ConfigError(f"{path} holds a {type(data).__name__}, expected a mapping of config keys")
    data = dict(data)
    base = data.pop("_BASE_", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise Detectron2ConfigError(f"_BASE_ in {path} is {base!r}, expected one file name")
    if base.startswith(("http://", "https://")):
        raise Detectron2ConfigError(f"_BASE_ in {path} is a URL ({base}); download it and point to the local file")
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    return _merge(load_detectron2_yaml(base_path, (*_chain, path)), data)


def _decode_value(value: Any) -> Any:
    """yacs' value decoding: strings that spell a Python literal (`"(512, 1024)"`, `"True"`) become that
    literal. `ast.literal_eval` only builds literals; it cannot call anything."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


class Detectron2Config:
    """Read-only view of a merged detectron2 config with upstream defaults for missing keys."""

    def __init__(self, values: Mapping[str, Any], source: str = "<config>"):
        self.values = dict(values)
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Detectron2Config:
        return cls(load_detectron2_yaml(path), source=str(path))

    def get(self, dotted: str) -> Any:
        for tree in (self.values, DETECTRON2_DEFAULTS):
            node: Any = tree
            for part in dotted.split("."):
                node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
                if node is _MISSING:
                    break
            if node is not _MISSING:
                if isinstance(node, UnevaluatedTag):
                    raise Detectron2ConfigError(
                        f"{dotted} in {self.source} is an unevaluated {node.tag} tag ({node.value!r}); "
                        "set it to a plain value to use it"
                    )
                return _decode_value(copy.deepcopy(node))
        raise Detectron2ConfigError(f"{dotted} is not set in {self.source} and has no known default")

    def error(self, key: str, value: Any, expected: str) -> Detectron2ConfigError:
        return Detectron2ConfigError(f"{key}={value!r} in {self.source}: {expected}")


def _as_int(cfg: Detectron2Config, key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise cfg.error(key, value, "expected an integer")
    return value


def _as_bool(cfg: Detectron2Config, key: str) -> bool:
    value = cfg.get(key)
    if not isinstance(value, bool):
        raise cfg.error(key, value, "expected true or false")
    return value


def _as_float(cfg: Detectron2Config, key: str) -> float:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise cfg.error(key, value, "expected a number")
    return float(value)


def _as_list(cfg: Detectron2Config, key: str) -> list[Any]:
    value = cfg.get(key)
    if not isinstance(value, (list, tuple)):
        raise cfg.error(key, value, "expected a list")
    return list(value)


def _input_is_bgr(cfg: Detectron2Config) -> bool:
    fmt = cfg.get("INPUT.FORMAT")
    if fmt not in ("RGB", "BGR"):
        raise cfg.error("INPUT.FORMAT", fmt, "expected RGB or BGR")
    return fmt == "BGR"


def _resnet_config(cfg: Detectron2Config) -> ResNetConfig:
    depth = _as_int(cfg, "MODEL.RESNETS.DEPTH")
    if depth not in RESNET_STAGE_BLOCKS:
        raise cfg.error(
            "MODEL.RESNETS.DEPTH", depth, f"expected one of {sorted(RESNET_STAGE_BLOCKS)} (bottleneck ResNets)"
        )
    norm = cfg.get("MODEL.RESNETS.NORM")
    if norm not in BATCHNORM_NORMS:
        raise cfg.error("MODEL.RESNETS.NORM", norm, f"expected a BatchNorm flavour ({', '.join(BATCHNORM_NORMS)})")
    groups = _as_int(cfg, "MODEL.RESNETS.NUM_GROUPS")
    if groups != 1:
        raise cfg.error("MODEL.RESNETS.NUM_GROUPS", groups, "expected 1: transformers' ResNet has no grouped (ResNeXt) convs")
    width = _as_int(cfg, "MODEL.RESNETS.WIDTH_PER_GROUP")
    res2_out = _as_int(cfg, "MODEL.RESNETS.RES2_OUT_CHANNELS")
    if width * 4 != res2_out:
        raise cfg.error(
            "MODEL.RESNETS.WIDTH_PER_GROUP",
            width,
            f"expected RES2_OUT_CHANNELS / 4 = {res2_out / 4:g}: transformers' bottleneck is always out_channels / 4 wide",
        )
    for key in ("MODEL.RESNETS.RES4_DILATION", "MODEL.RESNETS.RES5_DILATION"):
        if _as_int(cfg, key) != 1:
            raise cfg.error(key, cfg.get(key), "expected 1: transformers' ResNet has no dilated stages")
    deform = _as_list(cfg, "MODEL.RESNETS.DEFORM_ON_PER_STAGE")
    if any(deform):
        raise cfg.error("MODEL.RESNETS.DEFORM_ON_PER_STAGE", deform, "deformable convolutions are not supported")
    out_features = _as_list(cfg, "MODEL.RESNETS.OUT_FEATURES")
    if not set(_BACKBONE_OUT_FEATURES) <= set(out_features):
        raise cfg.error("MODEL.RESNETS.OUT_FEATURES", out_features, f"expected to include {_BACKBONE_OUT_FEATURES}")
    return ResNetConfig(
        embedding_size=_as_int(cfg, "MODEL.RESNETS.STEM_OUT_CHANNELS"),
        hidden_sizes=[res2_out * 2**i for i in range(4)],
        depths=RESNET_STAGE_BLOCKS[depth],
        layer_type="bottleneck",
        hidden_act="relu",
        # STRIDE_IN_1X1 puts the stride-2 of res3..res5 in the first 1x1 conv, as transformers'
        # downsample_in_bottleneck does; the released models have it in the 3x3 conv.
        downsample_in_bottleneck=_as_bool(cfg, "MODEL.RESNETS.STRIDE_IN_1X1"),
        downsample_in_first_stage=False,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )


def _swin_config(cfg: Detectron2Config) -> SwinConfig:
    if _as_bool(cfg, "MODEL.SWIN.APE"):
        raise cfg.error(
            "MODEL.SWIN.APE", True, "absolute position embeddings are not supported (the official one is "
            "interpolated per input size, transformers' is not)"
        )
    if not _as_bool(cfg, "MODEL.SWIN.PATCH_NORM"):
        raise cfg.error("MODEL.SWIN.PATCH_NORM", False, "expected true: transformers' Swin always normalises patches")
    if cfg.get("MODEL.SWIN.QK_SCALE") is not None:
        raise cfg.error("MODEL.SWIN.QK_SCALE", cfg.get("MODEL.SWIN.QK_SCALE"), "expected null (head_dim ** -0.5)")
    out_features = _as_list(cfg, "MODEL.SWIN.OUT_FEATURES")
    if out_features != _BACKBONE_OUT_FEATURES:
        raise cfg.error("MODEL.SWIN.OUT_FEATURES", out_features, f"expected {_BACKBONE_OUT_FEATURES}")
    depths = [int(d) for d in _as_list(cfg, "MODEL.SWIN.DEPTHS")]
    heads = [int(h) for h in _as_list(cfg, "MODEL.SWIN.NUM_HEADS")]
    if len(depths) != 4 or len(heads) != 4:
        raise cfg.error("MODEL.SWIN.DEPTHS", depths, f"expected 4 stages (NUM_HEADS={heads})")
    return SwinConfig(
        image_size=_as_int(cfg, "MODEL.SWIN.PRETRAIN_IMG_SIZE"),
        patch_size=_as_int(cfg, "MODEL.SWIN.PATCH_SIZE"),
        num_channels=3,
        embed_dim=_as_int(cfg, "MODEL.SWIN.EMBED_DIM"),
        depths=depths,
        num_heads=heads,
        window_size=_as_int(cfg, "MODEL.SWIN.WINDOW_SIZE"),
        mlp_ratio=_as_float(cfg, "MODEL.SWIN.MLP_RATIO"),
        qkv_bias=_as_bool(cfg, "MODEL.SWIN.QKV_BIAS"),
        hidden_dropout_prob=_as_float(cfg, "MODEL.SWIN.DROP_RATE"),
        attention_probs_dropout_prob=_as_float(cfg, "MODEL.SWIN.ATTN_DROP_RATE"),
        drop_path_rate=_as_float(cfg, "MODEL.SWIN.DROP_PATH_RATE"),
        hidden_act="gelu",
        use_absolute_embeddings=False,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )


def backbone_kind(cfg: Detectron2Config) -> str:
    """`"resnet"` or `"swin"`, from MODEL.BACKBONE.NAME."""
    name = cfg.get("MODEL.BACKBONE.NAME")
    if name == "build_resnet_backbone":
        return "resnet"
    if name == "D2SwinTransformer":
        return "swin"
    raise cfg.error("MODEL.BACKBONE.NAME", name, "expected build_resnet_backbone or D2SwinTransformer")


def _class_names(cfg: Detectron2Config, num_classes: int) -> tuple[tuple[str, ...], str]:
    """Class names and the dataset they come from, from DATASETS.TEST and NUM_CLASSES."""
    datasets = " ".join(str(d) for d in _as_list(cfg, "DATASETS.TEST")).lower()
    if num_classes == len(CITYSCAPES_CLASSES) and ("cityscapes" in datasets or "hazard" not in datasets):
        return CITYSCAPES_CLASSES, "cityscapes"
    if num_classes == len(STREETHAZARDS_CLASSES) and ("hazard" in datasets or "cityscapes" not in datasets):
        return STREETHAZARDS_CLASSES, "streethazards"
    return tuple(f"class_{i}" for i in range(num_classes)), "unknown"


def _check_head(cfg: Detectron2Config) -> None:
    checks = {
        "MODEL.META_ARCHITECTURE": ("MaskFormer",),
        "MODEL.SEM_SEG_HEAD.NAME": ("MaskFormerHead",),
        "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME": ("MSDeformAttnPixelDecoder",),
        "MODEL.SEM_SEG_HEAD.NORM": ("GN",),
        "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE": ("multi_scale_pixel_decoder",),
        "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME": (
            "MultiScaleMaskedTransformerDecoder",
            "MultiScaleMaskedTransformerDecoder_GMA",
        ),
    }
    for key, allowed in checks.items():
        value = cfg.get(key)
        if value not in allowed:
            raise cfg.error(key, value, f"expected {' or '.join(allowed)}")
    for key, expected in (
        ("MODEL.SEM_SEG_HEAD.IN_FEATURES", _BACKBONE_OUT_FEATURES),
        ("MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES", _BACKBONE_OUT_FEATURES[1:]),
    ):
        value = _as_list(cfg, key)
        if value != expected:
            raise cfg.error(key, value, f"expected {expected} (transformers' pixel decoder is built for these)")
    convs_dim = _as_int(cfg, "MODEL.SEM_SEG_HEAD.CONVS_DIM")
    if convs_dim % 32:
        raise cfg.error("MODEL.SEM_SEG_HEAD.CONVS_DIM", convs_dim, "expected a multiple of 32 (GroupNorm(32, C))")
    common_stride = _as_int(cfg, "MODEL.SEM_SEG_HEAD.COMMON_STRIDE")
    if common_stride not in (1, 2, 4, 8):
        raise cfg.error("MODEL.SEM_SEG_HEAD.COMMON_STRIDE", common_stride, "expected a power of two up to 8")
    if _as_int(cfg, "MODEL.MASK_FORMER.DEC_LAYERS") < 1:
        raise cfg.error("MODEL.MASK_FORMER.DEC_LAYERS", cfg.get("MODEL.MASK_FORMER.DEC_LAYERS"), "expected >= 1")
    loss = cfg.get("MODEL.MASK_FORMER.OOD_LOSS")
    if loss not in ("margin", "bce"):
        raise cfg.error("MODEL.MASK_FORMER.OOD_LOSS", loss, "expected margin or bce")


def config_from_detectron2(cfg: Detectron2Config) -> Mask2AnomalyConfig:
    """Build the `Mask2AnomalyConfig` a detectron2 config describes; every architecture value comes from it."""
    _check_head(cfg)
    kind = backbone_kind(cfg)
    backbone = _resnet_config(cfg) if kind == "resnet" else _swin_config(cfg)
    _input_is_bgr(cfg)
    num_classes = _as_int(cfg, "MODEL.SEM_SEG_HEAD.NUM_CLASSES")
    names, _ = _class_names(cfg, num_classes)
    decoder_name = cfg.get("MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME")
    try:
        return _mask2anomaly_config(cfg, backbone, names, decoder_name)
    except ValueError as error:  # a value the model cannot be built with (0 queries, heads not dividing the width)
        if isinstance(error, Detectron2ConfigError):
            raise
        raise Detectron2ConfigError(f"{cfg.source}: {error}") from None


def _mask2anomaly_config(cfg: Detectron2Config, backbone: Any, names: tuple[str, ...],
                         decoder_name: str) -> Mask2AnomalyConfig:
    config = Mask2AnomalyConfig(
        backbone_config=backbone,
        feature_size=_as_int(cfg, "MODEL.SEM_SEG_HEAD.CONVS_DIM"),
        mask_feature_size=_as_int(cfg, "MODEL.SEM_SEG_HEAD.MASK_DIM"),
        hidden_dim=_as_int(cfg, "MODEL.MASK_FORMER.HIDDEN_DIM"),
        # MSDeformAttnPixelDecoder hard-codes a 1024-wide FFN and reads its head count from MASK_FORMER.NHEADS
        # (not DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS), which is what transformers' single num_attention_heads does.
        encoder_feedforward_dim=1024,
        encoder_layers=_as_int(cfg, "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS"),
        decoder_layers=_as_int(cfg, "MODEL.MASK_FORMER.DEC_LAYERS"),
        num_attention_heads=_as_int(cfg, "MODEL.MASK_FORMER.NHEADS"),
        dropout=_as_float(cfg, "MODEL.MASK_FORMER.DROPOUT"),
        dim_feedforward=_as_int(cfg, "MODEL.MASK_FORMER.DIM_FEEDFORWARD"),
        pre_norm=_as_bool(cfg, "MODEL.MASK_FORMER.PRE_NORM"),
        enforce_input_projection=_as_bool(cfg, "MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ"),
        common_stride=_as_int(cfg, "MODEL.SEM_SEG_HEAD.COMMON_STRIDE"),
        ignore_value=_as_int(cfg, "MODEL.SEM_SEG_HEAD.IGNORE_VALUE"),
        num_queries=_as_int(cfg, "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES"),
        no_object_weight=_as_float(cfg, "MODEL.MASK_FORMER.NO_OBJECT_WEIGHT"),
        class_weight=_as_float(cfg, "MODEL.MASK_FORMER.CLASS_WEIGHT"),
        mask_weight=_as_float(cfg, "MODEL.MASK_FORMER.MASK_WEIGHT"),
        dice_weight=_as_float(cfg, "MODEL.MASK_FORMER.DICE_WEIGHT"),
        train_num_points=_as_int(cfg, "MODEL.MASK_FORMER.TRAIN_NUM_POINTS"),
        oversample_ratio=_as_float(cfg, "MODEL.MASK_FORMER.OVERSAMPLE_RATIO"),
        importance_sample_ratio=_as_float(cfg, "MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO"),
        use_auxiliary_loss=_as_bool(cfg, "MODEL.MASK_FORMER.DEEP_SUPERVISION"),
        feature_strides=[4, 8, 16, 32],
        global_masked_attention=decoder_name.endswith("_GMA"),
        contrastive_loss=cfg.get("MODEL.MASK_FORMER.OOD_LOSS"),
        contrastive_margin=_as_float(cfg, "MODEL.MASK_FORMER.MARGIN"),
        contrastive_weight=_as_float(cfg, "MODEL.MASK_FORMER.OOD_WEIGHT"),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    return config


def config_from_detectron2_yaml(path: str | os.PathLike) -> Mask2AnomalyConfig:
    """`Mask2AnomalyConfig` of a detectron2 YAML file (resolving `_BASE_`, never evaluating tags)."""
    return config_from_detectron2(Detectron2Config.from_file(path))


@dataclass(frozen=True)
class TestTimePreprocessing:
    """The official test-time pre-processing of a config, channel order already RGB, and its refinement rule
    (image-processor settings, written to preprocessor_config.json, never to the network's config)."""

    shortest_edge: int
    longest_edge: int
    image_mean: tuple[float, float, float]  # on the 0..255 scale
    image_std: tuple[float, float, float]
    size_divisibility: int
    input_is_bgr: bool
    refine: bool = False
    refine_class_ids: tuple[int, ...] = ()


def preprocessing_from_detectron2(cfg: Detectron2Config) -> TestTimePreprocessing:
    """Test-time resize, normalisation, padding and refinement of a detectron2 config. A BGR model's mean/std are
    returned in RGB order (the converter flips its first convolution to match)."""
    mean = [float(v) for v in _as_list(cfg, "MODEL.PIXEL_MEAN")]
    std = [float(v) for v in _as_list(cfg, "MODEL.PIXEL_STD")]
    if len(mean) != 3 or len(std) != 3:
        raise cfg.error("MODEL.PIXEL_MEAN", mean, f"expected 3 values each for PIXEL_MEAN and PIXEL_STD (std={std})")
    if not all(math.isfinite(v) for v in mean):
        raise cfg.error("MODEL.PIXEL_MEAN", mean, "expected 3 finite numbers")
    if not all(math.isfinite(v) and v > 0 for v in std):
        raise cfg.error("MODEL.PIXEL_STD", std, "expected 3 positive finite numbers (pixels are divided by them)")
    bgr = _input_is_bgr(cfg)
    if bgr:
        mean, std = mean[::-1], std[::-1]
    min_size = cfg.get("INPUT.MIN_SIZE_TEST")
    if isinstance(min_size, (list, tuple)):
        # detectron2 accepts a list and uses its only entry at test time
        min_size = min_size[0] if len(min_size) == 1 else min_size
    if not isinstance(min_size, int) or isinstance(min_size, bool):
        raise cfg.error("INPUT.MIN_SIZE_TEST", min_size, "expected one integer")
    if min_size < 1:
        raise cfg.error("INPUT.MIN_SIZE_TEST", min_size, "expected a positive number of pixels")
    if _as_int(cfg, "INPUT.MAX_SIZE_TEST") < min_size:
        raise cfg.error("INPUT.MAX_SIZE_TEST", cfg.get("INPUT.MAX_SIZE_TEST"), f"expected at least MIN_SIZE_TEST "
                        f"({min_size})")
    divisibility = _as_int(cfg, "MODEL.MASK_FORMER.SIZE_DIVISIBILITY")
    if divisibility < 0:
        # MaskFormer then asks the backbone: detectron2's ResNet needs no padding, D2SwinTransformer 32
        divisibility = 32 if backbone_kind(cfg) == "swin" else 0
    return TestTimePreprocessing(
        shortest_edge=min_size,
        longest_edge=_as_int(cfg, "INPUT.MAX_SIZE_TEST"),
        image_mean=tuple(mean),
        image_std=tuple(std),
        size_divisibility=divisibility,
        input_is_bgr=bgr,
        **_refinement(cfg),
    )


def _refinement(cfg: Detectron2Config) -> dict[str, Any]:
    """The official refinement rule: train ids 2..10 (hard-coded in the official `semantic_inference`) of the
    model's classes; the official StreetHazards script does not refine, the Cityscapes one does."""
    num_classes = _as_int(cfg, "MODEL.SEM_SEG_HEAD.NUM_CLASSES")
    _, dataset = _class_names(cfg, num_classes)
    refine_ids = tuple(i for i in CITYSCAPES_REFINE_CLASS_IDS if i < num_classes)
    return {"refine": dataset != "streethazards" and bool(refine_ids), "refine_class_ids": refine_ids}


__all__ = [
    "STREETHAZARDS_CLASSES",
    "Detectron2Config",
    "Detectron2ConfigError",
    "TestTimePreprocessing",
    "UnevaluatedTag",
    "backbone_kind",
    "config_from_detectron2",
    "config_from_detectron2_yaml",
    "load_detectron2_yaml",
    "preprocessing_from_detectron2",
]
