"""transformers pipelines for Mask2Anomaly: the widget's ``image-segmentation`` output and the raw anomaly map.

transformers' stock `ImageSegmentationPipeline` calls the processor's panoptic post-processing and finds nothing
for a semantic anomaly model; these pipelines call the anomaly and semantic post-processing instead:

- ``image-segmentation`` (`Mask2AnomalySegmentationPipeline`): the widget's list of ``{"label", "score", "mask"}``,
  one entry per Cityscapes class present in the semantic map (score: the mean of ``max_c S_c(x)`` over its
  pixels) and, when some pixel's anomaly score exceeds the threshold, an ``"anomaly"`` entry first (mask: those
  pixels; score: their mean anomaly score).
- ``anomaly-segmentation`` (`Mask2AnomalyMapPipeline`): a dict with the float32 ``anomaly_map`` and the
  ``semantic_map`` at the image's size, summary numbers and, with ``render=True``, the heatmap and palette
  pictures.

A saved model folder names both in its config's ``custom_pipelines`` and carries this file as remote code, so
``pipeline("image-segmentation", model=folder_or_hub_id, trust_remote_code=True)`` resolves to them. With this
package installed, pass ``pipeline_class=Mask2AnomalySegmentationPipeline`` instead.

This file travels to the Hub as remote code: it imports only the standard library, numpy, PIL, torch,
transformers and its sibling files.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image
from transformers import AutoModelForImageSegmentation, Pipeline
from transformers.image_utils import load_image as load_image_from_source
from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

from .image_processing_mask2anomaly import load_image, to_rgb_uint8
from .scorers import get_scorer
from .visualize import anomaly_mask, anomaly_summary, default_score_range, render_heatmap, render_semantic

logger = logging.get_logger(__name__)

ANOMALY_LABEL = "anomaly"


def read_image(source: Any) -> np.ndarray:
    """
    One pipeline input as an (H, W, 3) uint8 RGB array with its EXIF orientation applied.

    Accepts a local path (read with the processor's `load_image`, whose errors name the file), an http(s) URL or
    a base64 string (transformers' `load_image`), raw encoded bytes, a PIL image, or an array/tensor.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ValueError("Cannot read the image: got empty bytes")
        try:
            with Image.open(io.BytesIO(bytes(source))) as opened:
                opened.load()
                return to_rgb_uint8(opened)
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:
            raise ValueError(f"Cannot read the image from {len(source)} bytes: not a decodable image ({err})") from err
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if os.path.isfile(name):
            return to_rgb_uint8(load_image(name))
        return to_rgb_uint8(load_image_from_source(name))
    return to_rgb_uint8(source)


def segments_from_maps(
    anomaly_map: np.ndarray,
    semantic_map: np.ndarray,
    class_confidence: np.ndarray,
    id2label: dict[int, str],
    threshold: float,
) -> list[dict[str, Any]]:
    """
    The widget's image-segmentation entries from per-pixel maps of one image.

    Args:
        anomaly_map: (H, W) anomaly scores.
        semantic_map: (H, W) class ids.
        class_confidence: (H, W) score of the winning class, ``max_c S_c(x)``.
        id2label: class names.
        threshold: pixels whose anomaly score exceeds it form the ``"anomaly"`` entry.

    Returns:
        `list[dict]`: ``{"label", "score", "mask"}`` with ``mask`` an "L" PIL image (255 inside, 0 outside); the
        anomaly entry first when present, then the classes in id order.
    """
    if not anomaly_map.shape == semantic_map.shape == class_confidence.shape:
        raise ValueError(f"Expected maps of one size; got anomaly {anomaly_map.shape}, semantic {semantic_map.shape} "
                         f"and confidence {class_confidence.shape}")
    entries = []
    anomalous = anomaly_mask(anomaly_map, threshold)
    if anomalous.any():
        entries.append({
            "label": ANOMALY_LABEL,
            "score": float(anomaly_map[anomalous].mean()),
            "mask": Image.fromarray(anomalous.astype(np.uint8) * 255),
        })
    for class_id in np.unique(semantic_map):
        inside = semantic_map == class_id
        entries.append({
            "label": id2label.get(int(class_id), str(int(class_id))),
            "score": float(class_confidence[inside].mean()),
            "mask": Image.fromarray(inside.astype(np.uint8) * 255),
        })
    return entries


def _with_alias(value: Any, kwargs: dict[str, Any], name: str, alias: str) -> Any:
    """`value` of parameter `name`, or that of its older alias popped from `kwargs`; both given is an error."""
    other = kwargs.pop(alias, None)
    if value is not None and other is not None:
        raise ValueError(f"Got both {name}={value!r} and its alias {alias}={other!r}; pass one")
    return other if value is None else value


class Mask2AnomalySegmentationPipeline(Pipeline):
    """
    Anomaly segmentation with a Mask2Anomaly model, in the widget's image-segmentation format.

    Call with one image (path, URL, base64 string, bytes, PIL image or array) or a list of them. Parameters (each
    defaults to the image processor's setting of the same name, from preprocessor_config.json):

    - ``anomaly_threshold`` (`float`; alias ``threshold``): anomaly decision threshold (default: the processor's
      for its own scorer, the scorer's `default_threshold` for another one).
    - ``flip_tta`` (`bool`): average with the horizontally flipped image's map.
    - ``refine`` (`bool`): mask refinement by confident "stuff" queries.
    - ``anomaly_scorer`` (`str`; alias ``scorer``): one of the registered scorers (``scorers.ANOMALY_SCORERS``).

    Returns per image a list of ``{"label", "score", "mask"}`` (see `segments_from_maps`).
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(
        self,
        anomaly_threshold: float | None = None,
        flip_tta: bool | None = None,
        refine: bool | None = None,
        anomaly_scorer: str | None = None,
        **kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        anomaly_threshold = _with_alias(anomaly_threshold, kwargs, "anomaly_threshold", "threshold")
        anomaly_scorer = _with_alias(anomaly_scorer, kwargs, "anomaly_scorer", "scorer")
        extra = self._sanitize_extra(kwargs)
        if kwargs:
            raise ValueError(f"Unknown parameter(s) {sorted(kwargs)} for {type(self).__name__}; expected "
                             f"anomaly_threshold (or threshold), flip_tta, refine, anomaly_scorer (or scorer)"
                             f"{''.join(', ' + name for name in extra)}")
        if anomaly_scorer is not None:
            get_scorer(anomaly_scorer, "scorer")
        preprocess = {} if flip_tta is None else {"flip_tta": bool(flip_tta)}
        postprocess = {name: value for name, value in
                       (("threshold", anomaly_threshold), ("refine", refine), ("scorer", anomaly_scorer))
                       if value is not None}
        postprocess.update(extra)
        return preprocess, {}, postprocess

    def _sanitize_extra(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Subclass hook: pop the subclass's own parameters from `kwargs` into postprocess parameters."""
        return {}

    def preprocess(self, image: Any, flip_tta: bool | None = None) -> dict[str, Any]:
        flip_tta = self.image_processor.flip_tta if flip_tta is None else flip_tta
        rgb = read_image(image)
        # as the official script (and predict_anomaly): the flipped view is the flipped *original* image, resized
        # and padded on its own
        views = [rgb, np.ascontiguousarray(rgb[:, ::-1])] if flip_tta else [rgb]
        inputs = self.image_processor(views, return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"], "original_size": rgb.shape[:2], "image": rgb}

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        pixel_values = model_inputs["pixel_values"].to(dtype=self.model.dtype)
        outputs = self.model(pixel_values=pixel_values)
        # keep only what post-processing reads: hidden states of every layer would be dead weight here
        return {
            "class_queries_logits": outputs.class_queries_logits.float(),
            "masks_queries_logits": outputs.masks_queries_logits.float(),
            "original_size": model_inputs["original_size"],
            "image": model_inputs["image"],
        }

    def _maps(self, model_outputs: dict[str, Any], refine: bool | None, scorer: str | None) -> dict[str, np.ndarray]:
        """Anomaly map (flip-averaged when the flipped view was run), semantic map and class confidence."""
        class_logits, mask_logits = model_outputs["class_queries_logits"], model_outputs["masks_queries_logits"]

        def view(index: int) -> Mask2FormerForUniversalSegmentationOutput:
            return Mask2FormerForUniversalSegmentationOutput(
                class_queries_logits=class_logits[index:index + 1], masks_queries_logits=mask_logits[index:index + 1]
            )

        sizes = [tuple(int(v) for v in model_outputs["original_size"])]
        flipped = view(1) if class_logits.shape[0] == 2 else None
        maps = self.image_processor.post_process_anomaly_and_semantic(
            view(0), sizes, flipped_outputs=flipped, refine=refine, scorer=scorer
        )[0]
        return {
            "anomaly_map": maps.anomaly_map.numpy().astype(np.float32, copy=False),
            "semantic_map": maps.semantic_map.numpy(),
            "class_confidence": maps.class_confidence.numpy(),
        }

    def postprocess(
        self,
        model_outputs: dict[str, Any],
        threshold: float | None = None,
        refine: bool | None = None,
        scorer: str | None = None,
    ) -> list[dict[str, Any]]:
        threshold = self.image_processor.decision_threshold(scorer) if threshold is None else float(threshold)
        maps = self._maps(model_outputs, refine, scorer)
        return segments_from_maps(maps["anomaly_map"], maps["semantic_map"], maps["class_confidence"],
                                  self.model.config.id2label, threshold)


class Mask2AnomalyMapPipeline(Mask2AnomalySegmentationPipeline):
    """
    Anomaly segmentation returning the float map (task ``anomaly-segmentation``).

    Same inputs and parameters as `Mask2AnomalySegmentationPipeline`, plus ``render`` (`bool`, default False): also
    draw the heatmap (colour map over the image with a colour bar) and the semantic palette picture.

    Returns per image a dict: ``anomaly_map`` (H, W) float32, ``semantic_map`` (H, W) uint8 class ids, ``threshold``,
    ``max_score``, ``anomalous_fraction`` (share of pixels above the threshold) and, with ``render=True``,
    ``heatmap`` (RGB PIL image) and ``semantic`` (palette PIL image).
    """

    def _sanitize_extra(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"render": bool(kwargs.pop("render"))} if "render" in kwargs else {}

    def postprocess(
        self,
        model_outputs: dict[str, Any],
        threshold: float | None = None,
        refine: bool | None = None,
        scorer: str | None = None,
        render: bool = False,
    ) -> dict[str, Any]:
        scorer = self.image_processor.anomaly_scorer if scorer is None else scorer
        threshold = self.image_processor.decision_threshold(scorer) if threshold is None else float(threshold)
        maps = self._maps(model_outputs, refine, scorer)
        anomaly, semantic = maps["anomaly_map"], maps["semantic_map"]
        if semantic.size == 0 or semantic.max() <= 255:
            semantic = semantic.astype(np.uint8)
        summary = anomaly_summary(anomaly, threshold)
        result = {
            "anomaly_map": anomaly,
            "semantic_map": semantic,
            "threshold": threshold,
            "max_score": summary["max_score"],
            "anomalous_fraction": summary["anomalous_fraction"],
        }
        if render:
            vmin, vmax = default_score_range(anomaly, scorer)
            result["heatmap"] = render_heatmap(model_outputs["image"], anomaly, vmin, vmax, threshold=threshold)
            result["semantic"] = render_semantic(semantic)
        return result


# `pipeline("anomaly-segmentation", ...)` by name once this module is imported (from the package, or as remote
# code); "image-segmentation" is deliberately not registered globally, which would take the task from every
# other model: a model folder routes it here through its config's `custom_pipelines`.
if "anomaly-segmentation" not in PIPELINE_REGISTRY.supported_tasks:
    PIPELINE_REGISTRY.register_pipeline(
        "anomaly-segmentation", pipeline_class=Mask2AnomalyMapPipeline, pt_model=AutoModelForImageSegmentation,
        type="image",
    )

__all__ = [
    "ANOMALY_LABEL",
    "Mask2AnomalyMapPipeline",
    "Mask2AnomalySegmentationPipeline",
    "read_image",
    "segments_from_maps",
]
