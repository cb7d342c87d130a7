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

`init_from_mask2former` starts a Mask2Anomaly model from a transformers Mask2Former checkpoint (e.g. a
Cityscapes semantic model from the Hub), copying each decoder layer's foreground attention into its new
background attention, for stage-2 fine-tuning.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import Mask2FormerForUniversalSegmentation
from transformers.utils import logging

from .configuration_mask2anomaly import CITYSCAPES_CLASSES, CITYSCAPES_REFINE_CLASS_IDS, Mask2AnomalyConfig
from .d2_config import (
    Detectron2Config,
    Detectron2ConfigError,
    TestTimePreprocessing,
    backbone_kind,
    config_from_detectron2,
    config_from_detectron2_yaml,
    preprocessing_from_detectron2,
)
from .modeling_mask2anomaly import Mask2AnomalyForUniversalSegmentation

logger = logging.get_logger(__name__)

# Where each part of the official model lands in transformers' Mask2Former / Mask2Anomaly.
BACKBONE = "model.pixel_level_module.encoder."
PIXEL_DECODER = "model.pixel_level_module.decoder."
TRANSFORMER = "model.transformer_module."
DECODER_LAYERS = TRANSFORMER + "decoder.layers."

# How many keys an error message lists before it summarises the rest.
_LISTED_KEYS = 12


class ConversionError(ValueError):
    """A checkpoint that does not match the model its config describes (the message names the keys)."""


def _key_list(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_LISTED_KEYS])
    return shown + (f" ... and {len(keys) - _LISTED_KEYS} more" if len(keys) > _LISTED_KEYS else "")


# ----------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ----------------------------------------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for detectron2 `.pkl` checkpoints that can rebuild numpy arrays and plain containers and
    nothing else: any other global a pickle names is refused before it could be called."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("collections", "OrderedDict"),
            # Python 2 / protocol-2 pickles spell byte strings as _codecs.encode(text, "latin1")
            ("_codecs", "encode"),
        }
    )

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise ConversionError(
            f"{self.source} asks to unpickle {module}.{name}; a detectron2 .pkl checkpoint should hold only numpy "
            "arrays, so it is refused rather than run"
        )


def _load_pkl(path: Path) -> object:
    with open(path, "rb") as handle:
        try:
            return _NumpyOnlyUnpickler(handle, str(path)).load()
        except ConversionError:
            raise
        except Exception as error:  # a truncated or non-pickle file
            raise ConversionError(f"{path} is not a readable detectron2 .pkl checkpoint: {error}") from None


def _load_pth(path: Path) -> object:
    # mmap keeps the tensors on disk until they are used (new zip format only), which halves peak memory.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{path} holds objects other than tensors and plain containers, which torch.load(weights_only=True) "
            f"refuses to rebuild ({str(error).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {str(error).splitlines()[0]}") from None


def load_official_state_dict(checkpoint_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict of an official checkpoint, as torch tensors.

    Accepts detectron2's `{"model": state_dict, "optimizer": ..., "scheduler": ..., "iteration": ...}` (only
    `model` is read) or a bare state dict, from `.pth` (`torch.load(weights_only=True)`) or detectron2 `.pkl`
    (numpy arrays, read by an unpickler that rebuilds nothing else).
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist")
    raw = _load_pkl(path) if path.suffix == ".pkl" else _load_pth(path)
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{path} holds a {type(raw).__name__}, expected a state dict or {{'model': state dict}}")
    if "model" in raw and isinstance(raw["model"], Mapping):
        others = sorted(str(k) for k in raw if k != "model")
        if others:
            logger.info(f"{path.name}: reading 'model', ignoring {', '.join(others)}")
        if raw.get("matching_heuristics"):
            logger.warning(f"{path.name} is marked for detectron2's name-matching heuristics; keys must still be detectron2 names")
        raw = raw["model"]
    state: dict[str, torch.Tensor] = {}
    bad = []
    for key, value in raw.items():
        if isinstance(value, torch.Tensor):
            state[str(key)] = value
        elif isinstance(value, np.ndarray) and value.dtype != object:
            # (np.ascontiguousarray would turn 0-d arrays such as num_batches_tracked into 1-d ones)
            state[str(key)] = torch.from_numpy(value if value.flags.c_contiguous else value.copy(order="C"))
        else:
            bad.append(str(key))
    if bad:
        raise ConversionError(f"{path}: entries that are not arrays: {_key_list(bad)}")
    if not state:
        raise ConversionError(f"{path} holds no weights")
    # A state dict saved from a DistributedDataParallel wrapper carries a `module.` prefix on every key.
    if all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


# ----------------------------------------------------------------------------------------------------------
# Key mapping
# ----------------------------------------------------------------------------------------------------------
Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Rule:
    """A regex over official keys and the target key(s) a match becomes; `split` cuts a fused projection
    (`nn.MultiheadAttention.in_proj_*`, Swin `qkv`) into that many equal row blocks, one per target."""

    pattern: re.Pattern
    targets: Callable[[re.Match], list[str]]
    split: int = 1


def _rule(pattern: str, *targets: str | Callable[[re.Match], str], split: int = 1) -> _Rule:
    def expand(match: re.Match) -> list[str]:
        return [t(match) if callable(t) else match.expand(t) for t in targets]

    return _Rule(re.compile(pattern + r"\Z"), expand, split)


_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_WB = r"(weight|bias)"


def _stage(match: re.Match, group: int = 1) -> str:
    # detectron2 names stages res2..res5, transformers counts them from 0
    return str(int(match.group(group)) - 2)


def _resnet_rules() -> list[_Rule]:
    stage = BACKBONE + "encoder.stages."
    return [
        _rule(r"backbone\.stem\.conv1\.weight", BACKBONE + "embedder.embedder.convolution.weight"),
        _rule(r"backbone\.stem\.conv1\.norm\." + _BN, BACKBONE + r"embedder.embedder.normalization.\1"),
        _rule(
            r"backbone\.res([2-5])\.(\d+)\.conv([1-3])\.weight",
            lambda m: f"{stage}{_stage(m)}.layers.{m[2]}.layer.{int(m[3]) - 1}.convolution.weight",
        ),
        _rule(
            r"backbone\.res([2-5])\.(\d+)\.conv([1-3])\.norm\." + _BN,
            lambda m: f"{stage}{_stage(m)}.layers.{m[2]}.layer.{int(m[3]) - 1}.normalization.{m[4]}",
        ),
        _rule(
            r"backbone\.res([2-5])\.(\d+)\.shortcut\.weight",
            lambda m: f"{stage}{_stage(m)}.layers.{m[2]}.shortcut.convolution.weight",
        ),
        _rule(
            r"backbone\.res([2-5])\.(\d+)\.shortcut\.norm\." + _BN,
            lambda m: f"{stage}{_stage(m)}.layers.{m[2]}.shortcut.normalization.{m[3]}",
        ),
    ]


def _swin_rules() -> list[_Rule]:
    swin = BACKBONE + "swin."
    block = r"backbone\.layers\.(\d+)\.blocks\.(\d+)\."
    target = swin + r"encoder.layers.\1.blocks.\2."
    return [
        _rule(r"backbone\.patch_embed\.proj\." + _WB, swin + r"embeddings.patch_embeddings.projection.\1"),
        _rule(r"backbone\.patch_embed\.norm\." + _WB, swin + r"embeddings.norm.\1"),
        _rule(block + r"norm1\." + _WB, target + r"layernorm_before.\3"),
        _rule(block + r"norm2\." + _WB, target + r"layernorm_after.\3"),
        # qkv rows: [0:C] query, [C:2C] key, [2C:3C] value
        _rule(
            block + r"attn\.qkv\." + _WB,
            target + r"attention.q_proj.\3",
            target + r"attention.k_proj.\3",
            target + r"attention.v_proj.\3",
            split=3,
        ),
        _rule(block + r"attn\.proj\." + _WB, target + r"attention.o_proj.\3"),
        _rule(
            block + r"attn\.relative_position_bias_table",
            target + "attention.relative_position_bias.relative_position_bias_table",
        ),
        _rule(block + r"mlp\.(fc1|fc2)\." + _WB, target + r"mlp.\3.\4"),
        _rule(r"backbone\.layers\.(\d+)\.downsample\.reduction\.weight", swin + r"encoder.layers.\1.downsample.reduction.weight"),
        _rule(r"backbone\.layers\.(\d+)\.downsample\.norm\." + _WB, swin + r"encoder.layers.\1.downsample.norm.\2"),
        # D2SwinTransformer's per-output norms norm0..norm3 are transformers' hidden_states_norms stage1..4
        _rule(r"backbone\.norm([0-3])\." + _WB, lambda m: f"{BACKBONE}hidden_states_norms.stage{int(m[1]) + 1}.{m[2]}"),
    ]


def _renamed(source_prefix: str, target_prefix: str, names: Mapping[str, str]) -> list[_Rule]:
    """Rules for `weight`/`bias` of modules that only change name under a prefix with one index group."""
    return [
        _rule(source_prefix + re.escape(old) + r"\." + _WB, target_prefix + new + r".\2") for old, new in names.items()
    ]


def _head_rules() -> list[_Rule]:
    pd = r"sem_seg_head\.pixel_decoder\."
    enc = pd + r"transformer\.encoder\.layers\.(\d+)\."
    enc_t = PIXEL_DECODER + r"encoder.layers.\1."
    pr = r"sem_seg_head\.predictor\."
    sa = pr + r"transformer_self_attention_layers\.(\d+)\."
    ca = pr + r"transformer_cross_attention_layers\.(\d+)\."
    ffn = pr + r"transformer_ffn_layers\.(\d+)\."
    layer = DECODER_LAYERS + r"\1."
    return [
        # pixel decoder; input_proj is ordered res5, res4, res3 in both implementations
        _rule(pd + r"input_proj\.(\d+)\.([01])\." + _WB, PIXEL_DECODER + r"input_projections.\1.\2.\3"),
        _rule(pd + r"transformer\.level_embed", PIXEL_DECODER + "level_embed"),
        _rule(
            enc + r"self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\." + _WB,
            enc_t + r"self_attn.\2.\3",
        ),
        *_renamed(enc, enc_t, {"norm1": "self_attn_layer_norm", "linear1": "fc1", "linear2": "fc2", "norm2": "final_layer_norm"}),
        _rule(pd + r"mask_features\." + _WB, PIXEL_DECODER + r"mask_projection.\1"),
        # extra FPN levels: detectron2 Conv2d(norm=GN) -> Sequential(Conv2d, GroupNorm, ...)
        _rule(pd + r"(adapter_\d+|layer_\d+)\.weight", PIXEL_DECODER + r"\1.0.weight"),
        _rule(pd + r"(adapter_\d+|layer_\d+)\.norm\." + _WB, PIXEL_DECODER + r"\1.1.\2"),
        # transformer decoder
        _rule(
            sa + r"self_attn\.in_proj_(weight|bias)",
            layer + r"self_attn.q_proj.\2",
            layer + r"self_attn.k_proj.\2",
            layer + r"self_attn.v_proj.\2",
            split=3,
        ),
        _rule(sa + r"self_attn\.out_proj\." + _WB, layer + r"self_attn.out_proj.\2"),
        _rule(sa + r"norm\." + _WB, layer + r"self_attn_layer_norm.\2"),
        # GMA: foreground attention = transformers' cross_attn, background = cross_attn_background;
        # plain Mask2Former checkpoints call the single one multihead_attn
        _rule(
            ca + r"(?:multihead_attn_foreground|multihead_attn)\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
            layer + r"cross_attn.\2",
        ),
        _rule(
            ca + r"multihead_attn_background\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
            layer + r"cross_attn_background.\2",
        ),
        _rule(ca + r"norm\." + _WB, layer + r"cross_attn_layer_norm.\2"),
        *_renamed(ffn, layer, {"linear1": "fc1", "linear2": "fc2", "norm": "final_layer_norm"}),
        _rule(pr + r"decoder_norm\." + _WB, TRANSFORMER + r"decoder.layernorm.\1"),
        _rule(pr + r"query_feat\.weight", TRANSFORMER + "queries_features.weight"),
        _rule(pr + r"query_embed\.weight", TRANSFORMER + "queries_embedder.weight"),
        _rule(pr + r"level_embed\.weight", TRANSFORMER + "level_embed.weight"),
        _rule(pr + r"input_proj\.(\d+)\." + _WB, TRANSFORMER + r"input_projections.\1.\2"),
        _rule(pr + r"class_embed\." + _WB, r"class_predictor.\1"),
        _rule(pr + r"mask_embed\.layers\.(\d+)\." + _WB, TRANSFORMER + r"decoder.mask_predictor.mask_embedder.\1.0.\2"),
    ]


# Official keys with no counterpart, dropped on purpose (why, in the comment of each).
_DROPPED = [
    # GlobalCrossAttentionLayer owns a Conv2d(200, 100, 1) that its forward never calls
    re.compile(r"sem_seg_head\.predictor\.transformer_cross_attention_layers\.\d+\.fusion_layer\.(weight|bias)\Z"),
    # the no-object class weight of the loss: rebuilt from config.no_object_weight (checked below)
    re.compile(r"criterion\.empty_weight\Z"),
]
_SWIN_INDEX = re.compile(r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index\Z")


def _relative_position_index(window: int) -> torch.Tensor:
    """Swin's relative position index for a `window` x `window` window: (dh + w - 1) * (2w - 1) + (dw + w - 1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


@dataclass(frozen=True)
class TargetSpec:
    """Shape and dtype of one entry of the target model's state dict."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _fill_value(key: str, spec: TargetSpec, config: Mask2AnomalyConfig) -> torch.Tensor | None:
    """Value of a target entry that holds no learned weight, or None when the checkpoint must provide it."""
    if key.endswith(".num_batches_tracked"):
        # FrozenBatchNorm2d checkpoints (the released ones) carry no counter; it only matters in training mode
        return torch.zeros(spec.shape, dtype=spec.dtype)
    if key == "criterion.empty_weight":
        weight = torch.ones(spec.shape, dtype=spec.dtype)
        weight[-1] = config.no_object_weight
        return weight
    if key in (BACKBONE + "swin.layernorm.weight", BACKBONE + "swin.layernorm.bias"):
        # SwinModel's final norm: SwinBackbone never applies it (the official backbone has no such norm)
        return (torch.ones if key.endswith("weight") else torch.zeros)(spec.shape, dtype=spec.dtype)
    return None


def convert_state_dict(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, TargetSpec],
    config: Mask2AnomalyConfig,
    *,
    input_is_bgr: bool = False,
) -> dict[str, torch.Tensor]:
    """Map an official state dict onto the entries `target` (key -> shape/dtype of the transformers model).

    Raises `ConversionError` naming every checkpoint key that is neither mapped nor deliberately dropped,
    every model key left empty, and every shape that differs. With `input_is_bgr` (INPUT.FORMAT BGR) the
    first convolution's input channels are reversed so the converted model takes RGB like every
    transformers image model.
    """
    kind = "swin" if any(key.startswith(BACKBONE + "swin.") for key in target) else "resnet"
    rules = (_resnet_rules() if kind == "resnet" else _swin_rules()) + _head_rules()
    first_conv = {
        "resnet": BACKBONE + "embedder.embedder.convolution.weight",
        "swin": BACKBONE + "swin.embeddings.patch_embeddings.projection.weight",
    }[kind]
    window = getattr(config.backbone_config, "window_size", None)

    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown, dropped, duplicates, shape_errors = [], [], [], []
    for key, tensor in source.items():
        if any(pattern.match(key) for pattern in _DROPPED):
            dropped.append(key)
            continue
        index_match = _SWIN_INDEX.match(key)
        if index_match and kind == "swin":
            # transformers recomputes this buffer with the same formula; refuse a checkpoint whose buffer differs
            if window is None or not torch.equal(tensor.long(), _relative_position_index(window)):
                raise ConversionError(
                    f"{key} is not the standard relative position index of a {window}x{window} window "
                    f"(shape {list(tensor.shape)}); transformers' Swin cannot reproduce it"
                )
            dropped.append(key)
            continue
        if key.endswith(".num_batches_tracked") and not any(
            t.endswith(".num_batches_tracked") for t in target
        ):
            dropped.append(key)
            continue
        rule, match = next(((r, m) for r in rules if (m := r.pattern.match(key))), (None, None))
        if rule is None:
            unknown.append(key)
            continue
        names = rule.targets(match)
        if rule.split > 1:
            if tensor.shape[0] % rule.split:
                shape_errors.append(f"{key} {list(tensor.shape)} cannot be split into {rule.split} equal row blocks")
                continue
            parts = tensor.chunk(rule.split, dim=0)
        else:
            parts = (tensor,)
        for name, part in zip(names, parts):
            if name in converted:
                duplicates.append(f"{origin[name]} and {key} -> {name}")
            converted[name] = part
            origin[name] = key

    if unknown:
        raise ConversionError(
            f"{len(unknown)} checkpoint keys have no place in a {kind} Mask2Anomaly model: {_key_list(unknown)}"
        )
    if duplicates:
        raise ConversionError(f"checkpoint keys map onto the same model key: {'; '.join(duplicates[:_LISTED_KEYS])}")
    extra = [name for name in converted if name not in target]
    if extra:
        raise ConversionError(
            "checkpoint keys have no counterpart in the model this config describes: "
            + _key_list(f"{origin[name]} (-> {name})" for name in extra)
        )

    filled = []
    for name, spec in target.items():
        if name in converted:
            continue
        value = _fill_value(name, spec, config)
        if value is None:
            continue
        converted[name] = value
        origin[name] = "<filled>"
        filled.append(name)
    missing = [name for name in target if name not in converted]
    if missing:
        raise ConversionError(f"{len(missing)} model keys are missing from the checkpoint: {_key_list(missing)}")

    for name, spec in target.items():
        tensor = converted[name]
        if tuple(tensor.shape) != spec.shape:
            shape_errors.append(
                f"{origin[name]} has shape {list(tensor.shape)} but {name} expects {list(spec.shape)}"
            )
            continue
        if tensor.dtype != spec.dtype:
            converted[name] = tensor.to(spec.dtype)
    if shape_errors:
        raise ConversionError(f"{len(shape_errors)} shape mismatches: " + "; ".join(shape_errors[:_LISTED_KEYS]))

    official_empty_weight = source.get("criterion.empty_weight")
    if official_empty_weight is not None and "criterion.empty_weight" in target:
        rebuilt = converted["criterion.empty_weight"]
        if official_empty_weight.shape != rebuilt.shape or not torch.allclose(official_empty_weight.float(), rebuilt):
            logger.warning(
                f"the checkpoint's no-object loss weight {official_empty_weight[-1].item():g} differs from "
                f"NO_OBJECT_WEIGHT={config.no_object_weight:g} in the config; the config's value is kept"
            )
    if input_is_bgr:
        converted[first_conv] = converted[first_conv].flip(1)
    logger.info(
        f"mapped {len(source) - len(dropped)} checkpoint entries onto {len(target) - len(filled)} model entries; "
        f"dropped {len(dropped)} unused ({_summarise(dropped)}); filled {len(filled)} weightless buffers "
        f"({_summarise(filled)})"
    )
    return converted


def _summarise(keys: list[str]) -> str:
    if not keys:
        return "none"
    kinds: dict[str, int] = {}
    for key in keys:
        leaf = re.sub(r"\.\d+\.", ".*.", key).split(".")[-2:]
        kinds[".".join(leaf)] = kinds.get(".".join(leaf), 0) + 1
    return ", ".join(f"{count} x {kind}" for kind, count in sorted(kinds.items()))


# ----------------------------------------------------------------------------------------------------------
# Writing model folders
# ----------------------------------------------------------------------------------------------------------
def _empty_model(config: Mask2AnomalyConfig) -> Mask2AnomalyForUniversalSegmentation:
    # Built on the meta device: no memory and no random initialisation, the weights come from the checkpoint.
    with torch.device("meta"):
        return Mask2AnomalyForUniversalSegmentation(config)


def target_specs(model: torch.nn.Module) -> dict[str, TargetSpec]:
    """Shape and dtype of every state-dict entry of `model`."""
    return {key: TargetSpec(tuple(value.shape), value.dtype) for key, value in model.state_dict().items()}


def save_image_processor(
    preprocessing: TestTimePreprocessing, config: Mask2AnomalyConfig, directory: str | os.PathLike
) -> None:
    """Write `preprocessor_config.json`: the official test-time resize, normalisation and padding, and the
    model's post-processing settings (refinement, flip TTA, ...)."""
    from .image_processing_mask2anomaly import Mask2AnomalyImageProcessor

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


# ----------------------------------------------------------------------------------------------------------
# Mask2Former -> Mask2Anomaly
# ----------------------------------------------------------------------------------------------------------
def mask2former_config_from_mask2anomaly(config: Mask2AnomalyConfig):
    """The same architecture as a plain transformers `Mask2FormerConfig` (no global masked attention), e.g. to
    compare a Mask2Anomaly model with the Mask2Former it extends."""
    from transformers import Mask2FormerConfig

    fields = {k: v for k, v in config.to_dict().items() if k in Mask2FormerConfig.__dataclass_fields__}
    fields.pop("model_type", None)
    fields["backbone_config"] = config.backbone_config
    return Mask2FormerConfig(**fields)


def mask2anomaly_config_from_mask2former(mask2former_config) -> Mask2AnomalyConfig:
    """A `Mask2AnomalyConfig` with the architecture, classes and loss weights of a Mask2Former config and
    global masked attention switched on."""
    values = mask2former_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path"):
        values.pop(key, None)
    values["global_masked_attention"] = True
    # Refinement suppresses anomalies under confident Cityscapes "stuff" masks (train ids 2..10); it only
    # means something for a model with the Cityscapes classes.
    names = [str(name).lower() for _, name in sorted((int(i), n) for i, n in values.get("id2label", {}).items())]
    if tuple(names) == CITYSCAPES_CLASSES:
        values.update(refine=True, refine_class_ids=list(CITYSCAPES_REFINE_CLASS_IDS))
    else:
        logger.info("the Mask2Former's classes are not Cityscapes': mask refinement is switched off")
        values.update(refine=False, refine_class_ids=[])
    return Mask2AnomalyConfig(**values)


def init_from_mask2former(
    folder_or_model: str | os.PathLike | Mask2FormerForUniversalSegmentation, **from_pretrained_kwargs
) -> Mask2AnomalyForUniversalSegmentation:
    """Start a Mask2Anomaly model from a transformers Mask2Former (a folder, a Hub id, or a loaded model).

    Every Mask2Former weight is copied; each decoder layer's new background attention
    (`cross_attn_background`) starts as a copy of its foreground attention (`cross_attn`), which is how GMA
    fine-tuning starts from a closed-set Mask2Former.
    """
    if isinstance(folder_or_model, Mask2FormerForUniversalSegmentation):
        source = folder_or_model
    else:
        source = Mask2FormerForUniversalSegmentation.from_pretrained(folder_or_model, **from_pretrained_kwargs)
    config = mask2anomaly_config_from_mask2former(source.config)
    model = Mask2AnomalyForUniversalSegmentation(config)
    weights = source.state_dict()
    background = {}
    for key in model.state_dict():
        if ".cross_attn_background." in key:
            background[key] = weights[key.replace(".cross_attn_background.", ".cross_attn.")]
    result = model.load_state_dict({**weights, **background}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConversionError(
            f"Mask2Former weights do not fit Mask2Anomaly: missing {_key_list(result.missing_keys)}; "
            f"unexpected {_key_list(result.unexpected_keys)}"
        )
    layers = len(model.model.transformer_module.decoder.layers)
    logger.warning(
        f"Initialised Mask2Anomaly from Mask2Former: the background attention (cross_attn_background) of each of the "
        f"{layers} decoder layers is a copy of its foreground attention (cross_attn); fine-tune before use"
    )
    return model.to(next(source.parameters()).dtype)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mask2anomaly-convert",
        description="Convert an official detectron2 Mask2Anomaly checkpoint into a transformers model folder.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="official .pth / .pkl checkpoint")
    parser.add_argument("--config", required=True, type=Path, help="its detectron2 YAML config (_BASE_ is resolved)")
    parser.add_argument("--output-dir", required=True, type=Path, help="model folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    parser.add_argument("--verbose", action="store_true", help="log what was mapped, dropped and filled")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.set_verbosity_info() if args.verbose else logging.set_verbosity_warning()
    # one summary line is the whole output; transformers' "Writing model shards" bar is noise here
    logging.disable_progress_bar()
    start = time.perf_counter()
    try:
        output = convert_checkpoint(args.checkpoint, args.config, args.output_dir, overwrite=args.overwrite)
    except (ConversionError, Detectron2ConfigError, OSError) as error:
        print(f"mask2anomaly-convert: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    config = Mask2AnomalyConfig.from_pretrained(output)
    size = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    print(
        f"converted {args.checkpoint} -> {output} ({config.backbone_config.model_type}, {config.num_labels} classes, "
        f"{config.num_queries} queries, {config.decoder_layers - 1} decoder layers, "
        f"GMA {'on' if config.global_masked_attention else 'off'}, {size / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "ConversionError",
    "TargetSpec",
    "config_from_detectron2_yaml",
    "convert_checkpoint",
    "convert_state_dict",
    "init_from_mask2former",
    "load_official_state_dict",
    "main",
    "mask2anomaly_config_from_mask2former",
    "save_image_processor",
    "target_specs",
]
