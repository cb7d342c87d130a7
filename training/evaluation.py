"""Periodic validation during training: anomaly metrics of the validation splits, over all processes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from mask2anomaly_eval.pixel_metrics import PixelMetricAccumulator
from modeling_mask2anomaly.image_processing_mask2anomaly import Mask2AnomalyImageProcessor, iter_predict_anomaly


def _as_array(image: Any, mode: str) -> np.ndarray:
    if hasattr(image, "convert"):
        image = image.convert(mode)
    return np.asarray(image)



def evaluate_anomaly(model: torch.nn.Module, processor: Mask2AnomalyImageProcessor, splits: Mapping[str, Any],
                     accelerator: Accelerator | None = None, max_images: int | None = None,
                     scorer: str | None = None, flip_tta: bool = False, refine: bool | None = None,
                     batch_size: int = 4) -> dict[str, float]:
    """AuPRC, FPR95 and AUROC (pooled pixels, void 255 ignored) of each anomaly split `name -> dataset`.

    Images are spread over the processes and the per-process metric accumulators merged, so every process
    returns the same numbers. Keys are ``{name}_auprc``, ``{name}_fpr95`` and ``{name}_auroc``.
    """
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
