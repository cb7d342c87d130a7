"""``mask2anomaly-synthroad``: write a SynthRoad split as PNG files (numpy and PIL only: `--help` is instant)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from modeling_mask2anomaly.atomic_io import (  # the project's one atomic writer (stdlib only)
    write_atomically,
    write_text_atomically,
)
from modeling_mask2anomaly.cli import HelpFormatter

from .labels import GENERATOR_VERSION, METADATA_NAME, SPLITS
from .scenes import _check_arguments, iter_items


def write_png_atomic(array: np.ndarray, path: str) -> None:
    """Write `array` as a PNG at `path` so that `path` is either absent or complete: temp file, then rename."""
    write_atomically(path, lambda handle: Image.fromarray(array).save(handle, format="PNG"))


def main(argv: Sequence[str] | None = None) -> int:
    """`mask2anomaly-synthroad`: write a SynthRoad split as DIR/images/<stem>.png and DIR/labels/<stem>.png."""
    parser = argparse.ArgumentParser(
        prog="mask2anomaly-synthroad", formatter_class=HelpFormatter,
        description="Generate SynthRoad, the synthetic road-scene data set used to train and test Mask2Anomaly on a CPU.")
    parser.add_argument("--split", required=True, choices=SPLITS, help="which split to generate")
    parser.add_argument("--num", required=True, type=int, help="number of items (indices 0..num-1)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; same seed gives identical files")
    parser.add_argument("--output-dir", required=True, help="folder that receives images/ and labels/")
    # 128x256: the size the demo model's recipe (training/configs/synthroad.yaml) renders and trains at
    parser.add_argument("--height", type=int, default=128, help="image height in pixels (the synthroad recipe's)")
    parser.add_argument("--width", type=int, default=256, help="image width in pixels (the synthroad recipe's)")
    args = parser.parse_args(argv)
    try:
        _check_arguments(args.split, args.num, args.seed, args.height, args.width)
    except ValueError as error:
        parser.error(str(error))  # exits with status 2 and the usage line

    image_dir = os.path.join(args.output_dir, "images")
    label_dir = os.path.join(args.output_dir, "labels")
    try:
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
    except OSError as error:
        parser.error(f"cannot create output folders under {args.output_dir!r}: {error}")
    items = iter_items(args.split, args.num, args.seed, args.height, args.width)
    for stem, image, label in tqdm(items, total=args.num, desc=f"SynthRoad {args.split}", unit="scene"):
        write_png_atomic(image, os.path.join(image_dir, f"{stem}.png"))
        write_png_atomic(label, os.path.join(label_dir, f"{stem}.png"))
    # what the folder holds, for readers (mask2anomaly-eval names its results by the split and takes its track)
    metadata = {"split": args.split, "num": args.num, "seed": args.seed, "height": args.height, "width": args.width,
                "generator_version": GENERATOR_VERSION}
    write_text_atomically(os.path.join(args.output_dir, METADATA_NAME), json.dumps(metadata, indent=2) + "\n")
    print(f"wrote {args.num} {args.split} items ({args.height}x{args.width}, seed {args.seed}) to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
