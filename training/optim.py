"""The optimiser of detectron2's Mask2Former: AdamW parameter groups and the poly learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch

from .config import StageSettings
from .model import backbone_of

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
