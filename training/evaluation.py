"""Periodic validation during training: anomaly metrics of the validation splits, over all processes, through
the project's one evaluation loop (`mask2anomaly_eval.loop`), at the original image size."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator

from mask2anomaly_eval.loop import evaluate_splits
from modeling_mask2anomaly import Mask2AnomalyImageProcessor


def evaluate_anomaly(model: torch.nn.Module, processor: Mask2AnomalyImageProcessor, splits: Mapping[str, Any],
                     accelerator: Accelerator | None = None, max_images: int | None = None,
                     scorer: str | None = None, flip_tta: bool = False, refine: bool | None = None,
                     batch_size: int = 4) -> dict[str, float]:
    """AuPRC, FPR95 and AUROC (exact, pooled pixels, void 255 ignored) of each anomaly split `name -> dataset`.

    Images are spread over the processes and the per-process metric accumulators merged, so every process
    returns the same numbers. Keys are ``{name}_auprc``, ``{name}_fpr95`` and ``{name}_auroc``.
    """
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    return evaluate_splits(model, processor, splits, mode="exact", scorer=scorer, refine=refine, flip_tta=flip_tta,
                           batch_size=batch_size, accelerator=accelerator, limit=max_images, progress=False)
