"""Map an official state dict onto the entries of the transformers model: every checkpoint key mapped or
dropped on purpose, every model key filled, every shape checked; anything else is a `ConversionError`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers.utils import logging

from ..configuration_mask2anomaly import Mask2AnomalyConfig
from .errors import LISTED_KEYS, ConversionError, key_list
from .key_rules import BACKBONE, DROPPED, SWIN_INDEX, head_rules, relative_position_index, resnet_rules, swin_rules

logger = logging.get_logger(__name__)


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
    rules = (resnet_rules() if kind == "resnet" else swin_rules()) + head_rules()
    first_conv = {
        "resnet": BACKBONE + "embedder.embedder.convolution.weight",
        "swin": BACKBONE + "swin.embeddings.patch_embeddings.projection.weight",
    }[kind]
    window = getattr(config.backbone_config, "window_size", None)

    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown, dropped, duplicates, shape_errors = [], [], [], []
    for key, tensor in source.items():
        if any(pattern.match(key) for pattern in DROPPED):
            dropped.append(key)
            continue
        index_match = SWIN_INDEX.match(key)
        if index_match and kind == "swin":
            # transformers recomputes this buffer with the same formula; refuse a checkpoint whose buffer differs
            if window is None or not torch.equal(tensor.long(), relative_position_index(window)):
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
            f"{len(unknown)} checkpoint keys have no place in a {kind} Mask2Anomaly model: {key_list(unknown)}"
        )
    if duplicates:
        raise ConversionError(f"checkpoint keys map onto the same model key: {'; '.join(duplicates[:LISTED_KEYS])}")
    extra = [name for name in converted if name not in target]
    if extra:
        raise ConversionError(
            "checkpoint keys have no counterpart in the model this config describes: "
            + key_list(f"{origin[name]} (-> {name})" for name in extra)
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
        raise ConversionError(f"{len(missing)} model keys are missing from the checkpoint: {key_list(missing)}")

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
        raise ConversionError(f"{len(shape_errors)} shape mismatches: " + "; ".join(shape_errors[:LISTED_KEYS]))

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



def target_specs(model: torch.nn.Module) -> dict[str, TargetSpec]:
    """Shape and dtype of every state-dict entry of `model`."""
    return {key: TargetSpec(tuple(value.shape), value.dtype) for key, value in model.state_dict().items()}



__all__ = ["TargetSpec", "convert_state_dict", "target_specs"]
