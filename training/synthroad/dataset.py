"""SynthRoad as a Hugging Face `datasets.Dataset` (the same items as the command line writes)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import datasets
from PIL import Image

from .labels import GENERATOR_VERSION
from .scenes import _check_arguments, iter_items


def _synthroad_generator(split: str, num: int, seed: int, height: int, width: int) -> Iterator[dict]:
    for _, image, label in iter_items(split, num, seed, height, width):
        yield {"image": Image.fromarray(image), "label": Image.fromarray(label)}


def synthroad_dataset(split: str, num: int, seed: int = 0, height: int = 256, width: int = 512,
                      cache_dir: str | None = None):
    """SynthRoad `split` as a `datasets.Dataset` with `Image` features ``image`` (RGB) and ``label`` (L).

    Items equal those written by the command line for the same arguments. The dataset is cached by
    `datasets` under a fingerprint of the arguments and `GENERATOR_VERSION`.
    """
    _check_arguments(split, num, seed, height, width)
    key = f"synthroad-v{GENERATOR_VERSION}-{split}-{num}-{seed}-{height}x{width}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_generator(
        _synthroad_generator, features=features, cache_dir=cache_dir, fingerprint=fingerprint,
        gen_kwargs={"split": split, "num": num, "seed": seed, "height": height, "width": width})
