"""Inference Endpoints handler for a Mask2Anomaly model repository.

`mask2anomaly-publish` copies this file from the installed package into the model repository as ``handler.py``,
where it runs on its own: it imports only the standard library, PIL and transformers (never this package; the
model, its processor and the pipeline come from the repository's remote code), and nothing in the package imports
it. Custom-code models get no serverless widget; an Inference Endpoint built from the repository loads
`EndpointHandler(path)` and calls it per request:

    request:  {"inputs": <base64 string (optionally a data: URI) | raw image bytes | PIL image>,
               "parameters": {"anomaly_threshold": 0.5, "flip_tta": true, "refine": true,
                              "anomaly_scorer": "mask2anomaly"}}
    response: [{"label": "anomaly", "score": 0.83, "mask": "<base64 PNG>"}, {"label": "road", ...}, ...]

the widget's image-segmentation JSON: one entry per Cityscapes class present, and an "anomaly" entry (pixels whose
anomaly score exceeds the threshold; score = their mean anomaly score) when there are any. Masks are "L" PNGs,
255 inside and 0 outside, at the image's size. Every parameter is optional and defaults to the image processor's
setting of the same name; `threshold` and `scorer` are accepted as aliases of `anomaly_threshold` and
`anomaly_scorer`.

The endpoint needs only transformers, torch, numpy, pillow and scipy: the model, its processor and the pipeline
come from the repository's remote code (trust_remote_code).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image
from transformers import pipeline

PARAMETERS = ("anomaly_threshold", "flip_tta", "refine", "anomaly_scorer", "threshold", "scorer")


def decode_image(inputs: Any) -> Image.Image | bytes:
    """The request's `inputs` as something the pipeline reads: a PIL image or encoded bytes as they are, a string
    decoded as base64 (data: URIs too). Strings are never taken as paths or URLs: a request must not make the
    endpoint read its own files or fetch addresses. Raises ValueError saying what was received and expected."""
    if isinstance(inputs, Image.Image):
        return inputs
    if isinstance(inputs, str):
        text = inputs.strip()
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            inputs = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"'inputs' is a string of {len(inputs)} characters that is not valid base64; expected "
                             f"a base64-encoded image file") from err
    if isinstance(inputs, (bytes, bytearray)):
        if not inputs:
            raise ValueError("'inputs' holds no bytes; expected an encoded image (PNG, JPEG, ...)")
        return bytes(inputs)  # the pipeline decodes them and names the reason when it cannot
    raise ValueError(f"'inputs' has type {type(inputs).__name__}; expected a base64 string, bytes or a PIL image")


def encode_mask(mask: Image.Image) -> str:
    """A mask as a base64 PNG string (what the widget's image-segmentation JSON carries)."""
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class EndpointHandler:
    """Loads the repository at `path` once; each call segments one image (see the module docstring)."""

    def __init__(self, path: str = "") -> None:
        # the model folder's config routes "image-segmentation" to the Mask2Anomaly pipeline in its remote code
        self.pipeline = pipeline("image-segmentation", model=path or ".", trust_remote_code=True)

    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError(f"Expected a request {{'inputs': <image>, 'parameters': {{...}}}}; got "
                             f"{type(data).__name__} with keys {sorted(data) if isinstance(data, dict) else '-'}")
        parameters = data.get("parameters") or {}
        unknown = sorted(set(parameters) - set(PARAMETERS))
        if unknown:
            raise ValueError(f"Unknown parameter(s) {unknown}; expected some of {', '.join(PARAMETERS)}")
        image = decode_image(data["inputs"])
        segments = self.pipeline(image, **parameters)
        return [{"label": s["label"], "score": s["score"], "mask": encode_mask(s["mask"])} for s in segments]
