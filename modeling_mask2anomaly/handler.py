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

Limits: an image of more than `max_pixels` pixels (default `DEFAULT_MAX_PIXELS`, 5000 x 5000; the
``MASK2ANOMALY_MAX_PIXELS`` environment variable or the constructor's `max_pixels` set another) is refused from its
header, before its pixels are decoded: a small PNG can hold a huge image (an 8000 x 8000 PNG of 200 KB decodes
into 2.3 GB), and PIL's decompression-bomb warning is an error here. Parameters are checked by type before
anything runs: thresholds are finite numbers, `flip_tta` and `refine` JSON booleans (the string "false" is
refused, not taken as true), scorers strings; every refusal is a ValueError of one line.

The endpoint needs only transformers, torch, numpy, pillow and scipy: the model, its processor and the pipeline
come from the repository's remote code (trust_remote_code).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import warnings
from typing import Any

from PIL import Image
from transformers import pipeline

# each parameter and the JSON type it must have
PARAMETERS = {"anomaly_threshold": "number", "threshold": "number", "flip_tta": "boolean", "refine": "boolean",
              "anomaly_scorer": "string", "scorer": "string"}
DEFAULT_MAX_PIXELS = 5000 * 5000
MAX_PIXELS_VARIABLE = "MASK2ANOMALY_MAX_PIXELS"


def check_parameters(parameters: Any) -> dict[str, Any]:
    """The request's `parameters` checked by type (see `PARAMETERS`): a dict (or null) of known names whose values
    are finite numbers, JSON booleans or strings. Raises ValueError naming the parameter, its value and the type
    expected."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ValueError(f"'parameters' is {type(parameters).__name__} {parameters!r:.80}; expected an object such "
                         f"as {{\"anomaly_threshold\": 0.5, \"flip_tta\": true}}")
    unknown = sorted(map(str, set(parameters) - set(PARAMETERS)))
    if unknown:
        raise ValueError(f"Unknown parameter(s) {unknown}; expected some of {', '.join(PARAMETERS)}")
    for name, value in parameters.items():
        expected = PARAMETERS[name]
        if expected == "number":
            valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif expected == "boolean":
            valid = isinstance(value, bool)
        else:
            valid = isinstance(value, str)
        if not valid:
            extra = " (finite)" if expected == "number" else ""
            raise ValueError(f"Parameter {name!r} is {type(value).__name__} {value!r:.80}; expected a{extra} "
                             f"JSON {expected}")
    return dict(parameters)


def _max_pixels_from_environment() -> int:
    text = os.environ.get(MAX_PIXELS_VARIABLE)
    if text is None:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_PIXELS_VARIABLE}={text!r}; expected a positive whole number of pixels")
    return value


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ValueError(f"'inputs' is a {width}x{height} image ({width * height} pixels); this endpoint accepts at "
                         f"most {max_pixels} pixels ({MAX_PIXELS_VARIABLE})")


def decode_image(inputs: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The request's `inputs` as a decoded PIL image: a PIL image as it is, encoded bytes or a string decoded as
    base64 (data: URIs too). Strings are never taken as paths or URLs: a request must not make the endpoint read
    its own files or fetch addresses. An image of more than `max_pixels` pixels is refused from its header, before
    the pixels are decoded. Raises ValueError saying what was received and expected."""
    if isinstance(inputs, Image.Image):
        _check_size(*inputs.size, max_pixels)
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
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(bytes(inputs)))  # reads the header only
                _check_size(*image.size, max_pixels)
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ValueError(f"'inputs' is refused as a decompression bomb ({err})") from None
        except (OSError, SyntaxError) as err:
            raise ValueError(f"'inputs' ({len(inputs)} bytes) is not a decodable image ({err})") from None
        return image
    raise ValueError(f"'inputs' has type {type(inputs).__name__}; expected a base64 string, bytes or a PIL image")


def encode_mask(mask: Image.Image) -> str:
    """A mask as a base64 PNG string (what the widget's image-segmentation JSON carries)."""
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class EndpointHandler:
    """Loads the repository at `path` once; each call segments one image (see the module docstring)."""

    def __init__(self, path: str = "", max_pixels: int | None = None) -> None:
        self.max_pixels = _max_pixels_from_environment() if max_pixels is None else int(max_pixels)
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels={max_pixels!r}; expected a positive whole number of pixels")
        # the model folder's config routes "image-segmentation" to the Mask2Anomaly pipeline in its remote code
        self.pipeline = pipeline("image-segmentation", model=path or ".", trust_remote_code=True)

    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError(f"Expected a request {{'inputs': <image>, 'parameters': {{...}}}}; got "
                             f"{type(data).__name__} with keys {sorted(data) if isinstance(data, dict) else '-'}")
        parameters = check_parameters(data.get("parameters"))
        # the pipeline checks the values (a scorer's name, ...) before it reads the image or runs the model
        self.pipeline._sanitize_parameters(**parameters)
        image = decode_image(data["inputs"], self.max_pixels)
        segments = self.pipeline(image, **parameters)
        return [{"label": s["label"], "score": s["score"], "mask": encode_mask(s["mask"])} for s in segments]
