"""Closed-set quality of a model: mean IoU of its semantic maps on a folder of labelled images.

The folder has ``images/`` and ``labels/`` with the same stems (what ``mask2anomaly-synthroad --split val`` writes;
labels are class ids, 255 void). The semantic map is the processor's ``argmax_c S_c`` of the un-flipped view (the
one `predict_anomaly` returns; flip TTA and refinement only change the anomaly map). IoU per class is computed from
one confusion matrix over all pixels; mIoU is the mean over the classes that occur in the labels or the predictions
(a class present in neither is left out, one predicted but absent from the labels counts with IoU 0)::

    python -m mask2anomaly_eval.semantic --model demo_model --data-dir outputs/synthroad/val --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modeling_mask2anomaly.cli import add_threads_argument, apply_threads

from .io import read_label_png


def confusion_matrix(prediction: np.ndarray, label: np.ndarray, num_classes: int,
                     ignore_index: int = 255) -> np.ndarray:
    """``(num_classes, num_classes)`` int64 counts, rows = label class, columns = predicted class; pixels with
    ``ignore_index`` (or any label outside ``0..num_classes-1``) are left out."""
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {prediction.shape} and label {label.shape} differ in size")
    label = label.astype(np.int64).ravel()
    prediction = prediction.astype(np.int64).ravel()
    keep = (label != ignore_index) & (label >= 0) & (label < num_classes)
    index = label[keep] * num_classes + np.clip(prediction[keep], 0, num_classes - 1)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-class IoU (NaN for a class neither labelled nor predicted) and their mean over the other classes."""
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
    return iou, float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


class DataFolderError(ValueError):
    """The data folder cannot be scored: no images, an image without its label, a label that cannot be read or
    is not the image's size. The message names the file."""


class ModelLoadError(ValueError):
    """A model folder that exists but cannot be loaded (a broken config.json, unreadable weights)."""


def evaluate_semantic(model_path: str, data_dir: str | Path, limit: int | None = None,
                      batch_size: int = 1, device: str = "cpu") -> dict:
    """mIoU, pixel accuracy and per-class IoU of `model_path` on `data_dir` (see the module docstring)."""
    from modeling_mask2anomaly.inference import ModelNotFoundError, iter_predict_anomaly, load_model_and_processor

    from .datasets import _paired_folders  # imported here: it loads transformers, which --help does not need

    data_dir = Path(data_dir)
    try:
        pairs = _paired_folders(("images",), ("labels",))(data_dir)[:limit]  # the benchmark readers' pairing
    except (OSError, ValueError) as err:
        raise DataFolderError(str(err)) from None
    if not pairs:
        raise DataFolderError(f"no images in {data_dir / 'images'}")
    for image, label in pairs:
        if label is None:
            raise DataFolderError(f"label {data_dir / 'labels' / (image.stem + '.png')} not found for image "
                                  f"{image.name}")
    images, labels = [image for image, _ in pairs], [label for _, label in pairs]
    try:
        model, processor = load_model_and_processor(model_path, device=device)
    except ModelNotFoundError:
        raise
    except (OSError, ValueError) as err:  # the folder exists but does not load
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelLoadError(f"cannot load {model_path}: {reason}") from None
    num_classes = int(model.config.num_labels)
    id2label = getattr(model.config, "id2label", None) or {}
    confusion = np.zeros((num_classes, num_classes), np.int64)
    predictions = iter_predict_anomaly(model, processor, images, flip_tta=False, refine=False, batch_size=batch_size)
    for label_path in labels:
        try:
            prediction = next(predictions)  # an image that cannot be read is refused here, by name
        except (OSError, ValueError) as err:
            raise DataFolderError(str(err)) from None
        try:
            confusion += confusion_matrix(prediction.semantic_map, read_label_png(label_path), num_classes)
        except (OSError, ValueError) as err:
            raise DataFolderError(f"{label_path}: {err}") from None
    iou, miou = iou_from_confusion(confusion)
    return {
        "model": str(model_path), "data_dir": str(data_dir), "images": len(images),
        "miou": miou, "pixel_accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
        "per_class_iou": {str(id2label.get(c, id2label.get(str(c), c))): float(iou[c])
                          for c in range(num_classes) if np.isfinite(iou[c])},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mask2anomaly_eval.semantic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--data-dir", required=True, help="folder with images/ and labels/ (class ids, 255 void)")
    parser.add_argument("--output", help="also write the result as JSON to this file")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by name)")
    parser.add_argument("--batch-size", type=int, default=1)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    from modeling_mask2anomaly.inference import ModelNotFoundError  # here: it loads transformers, --help does not

    try:
        result = evaluate_semantic(args.model, args.data_dir, limit=args.limit, batch_size=args.batch_size)
    except (ModelNotFoundError, ModelLoadError) as err:
        print(f"{parser.prog}: --model: {err}", file=sys.stderr)
        return 2
    except DataFolderError as err:  # missing images/labels, a bad label file
        print(f"{parser.prog}: --data-dir: {err}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    print(f"mIoU {100 * result['miou']:.1f}  pixel accuracy {100 * result['pixel_accuracy']:.1f}  "
          f"({result['images']} images of {args.data_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
