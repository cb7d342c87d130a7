"""Reading label images: the one reader of single-channel label PNGs that the benchmark readers, the evaluation
loop and the training data sources share."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
from PIL import Image

# PIL modes of a single-channel label image; a palette ("P") image gives its indices, not its colours.
LABEL_IMAGE_MODES: tuple[str, ...] = ("L", "P", "I", "I;16", "1")


class LabelReadError(ValueError):
    """A label image file that cannot be read; the message names it (``path``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def read_label_png(source: str | os.PathLike | Image.Image, name: Any = None) -> np.ndarray:
    """A single-channel label image (a file path or an open PIL image) as an integer array ``(H, W)``.

    Raw values, no convention applied (each benchmark's reader maps them to 0 / 1 / 255). Raises ``ValueError``
    naming the file (or ``name``) for an unreadable file or a colour image, so that RGB renderings of a label
    are not silently read as luminance (for a file: a `LabelReadError`, which carries its path). A label
    of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels is refused from its header, before it is decoded.
    """
    if isinstance(source, Image.Image):
        return _label_array(source, name if name is not None else "label image")
    path = os.fspath(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # PIL checks the size in the header (warning: error here)
                return _label_array(image, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise LabelReadError(path, f"label image {path} is above the pixel limit PIL.Image.MAX_IMAGE_PIXELS = "
                                   f"{Image.MAX_IMAGE_PIXELS}, refused before decoding ({err})") from None
    except (OSError, SyntaxError) as err:  # PIL raises these for missing, truncated or non-image files
        raise LabelReadError(path, f"cannot read label image {path}: {err}") from None


def _label_array(image: Image.Image, name: Any) -> np.ndarray:
    if image.mode not in LABEL_IMAGE_MODES:
        raise ValueError(f"label image {name} has mode {image.mode!r}; expected a single-channel (L/P/I) PNG")
    return np.array(image)
