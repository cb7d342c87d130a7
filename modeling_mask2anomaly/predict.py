"""`mask2anomaly-predict`: anomaly maps, heatmaps and semantic maps for image files, folders and globs.

Per image it writes, into `--output-dir`:

- ``<stem>_anomaly.npy``: float32 anomaly scores, height x width of the input image (EXIF orientation applied);
- ``<stem>_heatmap.png``: the scores as an "inferno"-like colour map blended over the image, with a colour bar;
- ``<stem>_semantic.png``: the semantic map as a palette PNG with the Cityscapes colours;

the three written into a staging folder inside the output folder and then renamed into place, so an interrupted
or failed run never leaves a partial file and never removes the outputs of an earlier run. Output names are unique
over all inputs (``a/x.png`` and ``b/x.png`` give ``x`` and ``x-2``). It prints one summary line per image (max
score, anomalous area at the threshold) and one line per input that failed, naming the file and the reason (not
readable, a folder that cannot be read, an image too thin to resize, a map with NaN or infinite scores: nothing is
written for it); the exit status is 1 when any input failed, 2 for bad arguments (a model that does not load, an
``--output-dir`` that is a file), and then no output folder is created.

Images are read lazily (converted to RGB once, by `load_image`) and predicted up to `--batch-size` at a time
(`inference.batches_of_equal_size` then `inference.predict_batch`), so memory is bounded by one batch however many
images there are; only consecutive images of the same processed size share a batch, so the maps do not depend on
`--batch-size`. The processor resizes to shortest side 1024 / longest 2048 unless `--no-resize`.

With `--format smiyc --method NAME --dataset AnomalyTrack-test` (or another dataset of the SegmentMeIfYouCan kit) it
writes instead the kit's per-frame files, `<output-dir>/anomaly_p/NAME/<dataset folder>/<frame id>.hdf5`, and with
`--format fishyscapes` the Fishyscapes container's `<output-dir>/DDDD_anomaly.npy` and `DDDD_segmentation.npy` for
inputs named `DDDD_*.png` (`mask2anomaly_eval.submission`).

Flags are named as the processor settings they override: `--anomaly-scorer` (`anomaly_scorer`; alias `--scorer`)
and `--anomaly-threshold` (`anomaly_threshold`; alias `--threshold`).
"""

from __future__ import annotations

import argparse
import glob
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from .atomic_io import write_files_atomically
from .cli import DTYPE_NAMES, OUTPUT_FORMATS  # noqa: F401  (OUTPUT_FORMATS: part of this module's interface)
from .cli import build_predict_parser as build_parser  # noqa: F401
from .cli import predict_main as main  # noqa: F401  (`python -m modeling_mask2anomaly.predict`)
from .image_processing_mask2anomaly import IMAGE_EXTENSIONS, load_image
from .inference import (
    AnomalyPrediction,
    ModelNotFoundError,
    _input_placement,
    batches_of_equal_size,
    load_model_and_processor,
    predict_batch,
    resolve_device,
)
from .scorers import DEFAULT_SCORER, get_scorer
from .visualize import anomaly_summary, default_score_range, render_heatmap, render_semantic

OUTPUT_SUFFIXES: tuple[str, ...] = ("_anomaly.npy", "_heatmap.png", "_semantic.png")


# ------------------------------------------------------------------------------------------------------ inputs


def collect_inputs(sources: Sequence[str], exclude_dir: str | os.PathLike | None = None) -> tuple[list[Path], list[str]]:
    """
    Expand files, folders (recursively) and glob patterns into a sorted, de-duplicated list of image paths.

    Files named explicitly are always taken (a bad one is then reported as bad); files found in folders or by a
    glob are taken when their extension is an image extension, except this command's own pictures
    (``*_heatmap.png``, ``*_semantic.png``) inside `exclude_dir` (the output folder), so that a second run does not
    predict on its own heatmaps while inputs below the output folder (``--output-dir .``) are still found.

    Returns:
        (paths, problems): the paths in order, and one message per source that matched nothing and per file or
        folder that could not be read (its images are skipped, the others still collected).
    """
    extensions = IMAGE_EXTENSIONS
    excluded = Path(exclude_dir).resolve() if exclude_dir is not None else None
    own_pictures = tuple(suffix for suffix in OUTPUT_SUFFIXES if suffix.endswith(".png"))
    problems: list[str] = []

    def wanted(path: Path) -> bool:
        if path.suffix.lower() not in extensions:
            return False
        if excluded is not None and path.name.endswith(own_pictures):
            return excluded not in path.resolve().parents
        return True

    def unreadable_folder(error: OSError) -> None:
        problems.append(f"{error.filename}: folder cannot be read ({error.strerror}); its images are skipped")

    def walk(folder: Path) -> list[Path]:
        found = []
        for root, folders, files in os.walk(folder, onerror=unreadable_folder):
            folders.sort()
            candidates = (Path(root) / name for name in files)
            found.extend(path for path in candidates if os.path.isfile(path) and wanted(path))
        return sorted(found)

    paths: list[Path] = []
    for source in sources:
        path = Path(source)
        try:
            mode = os.stat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            mode = None
        except OSError as error:  # e.g. a file inside a folder this user may not enter
            problems.append(f"{source}: cannot be read ({error.strerror})")
            continue
        if mode is not None and stat.S_ISDIR(mode):
            found = walk(path)
            if not found:
                problems.append(f"{source}: folder holds no image files ({', '.join(extensions)})")
        elif mode is not None:
            found = [path]
        elif glob.has_magic(source):
            found = sorted(p for p in map(Path, glob.glob(source, recursive=True)) if p.is_file() and wanted(p))
            if not found:
                problems.append(f"{source}: pattern matches no image files")
        else:
            problems.append(f"{source}: no such file or folder")
            continue
        paths.extend(found)
    # the same file reached twice (named and inside a folder) is predicted once, under the name it first came by
    seen: set[Path] = set()
    unique: list[Path] = []
    for path in paths:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique, problems


def output_stems(paths: Sequence[Path]) -> list[str]:
    """Output name stems, unique over all inputs: the file stem, or when an earlier input took it, the stem with
    ``-2``, ``-3``, ... (the first such name that no input has as its own stem, so that ``a/x.png``, ``b/x.png`` and
    ``c/x-2.png`` give ``x``, ``x-3`` and ``x-2``). Compared case-insensitively, as some file systems do."""
    natural = {path.stem.casefold() for path in paths}
    taken: set[str] = set()
    stems = []
    for path in paths:
        stem = path.stem
        if stem.casefold() in taken:
            count = 2
            while f"{path.stem}-{count}".casefold() in taken | natural:
                count += 1
            stem = f"{path.stem}-{count}"
        taken.add(stem.casefold())
        stems.append(stem)
    return stems


# ------------------------------------------------------------------------------------------------------ outputs


def write_outputs(
    output_dir: Path,
    stem: str,
    image: np.ndarray,
    prediction: AnomalyPrediction,
    scorer: str,
    threshold: float,
) -> list[Path]:
    """Write the three outputs of one image as one unit: all are written into a staging folder, then renamed into
    `output_dir`; on any failure nothing is renamed (the outputs of an earlier run stay as they were) and the
    staging folder is removed, then the error is re-raised."""
    anomaly = np.ascontiguousarray(prediction.anomaly_map, dtype=np.float32)
    vmin, vmax = default_score_range(anomaly, scorer)

    def write(staging: Path) -> None:
        with open(staging / f"{stem}{OUTPUT_SUFFIXES[0]}", "wb") as handle:
            np.save(handle, anomaly, allow_pickle=False)
        heatmap = render_heatmap(image, anomaly, vmin, vmax, threshold=threshold)
        heatmap.save(staging / f"{stem}{OUTPUT_SUFFIXES[1]}", format="PNG")
        del heatmap
        render_semantic(prediction.semantic_map).save(staging / f"{stem}{OUTPUT_SUFFIXES[2]}", format="PNG")

    return write_files_atomically(output_dir, write)


def check_prediction(prediction: AnomalyPrediction) -> None:
    """ValueError when the anomaly map holds NaN or infinite scores (NaN weights, an `image_std` of 0, ...): such
    a map is a failure of the image, never an output."""
    finite = np.isfinite(prediction.anomaly_map)
    if not finite.all():
        raise ValueError(f"the model gave {finite.size - int(finite.sum())} non-finite anomaly scores (NaN or inf) "
                         f"of {finite.size}; nothing written (NaN weights or an image_std of 0 in the processor?)")


def check_resizable(processor: Any, image: np.ndarray, do_resize: bool | None) -> None:
    """ValueError when resizing would round a side of `image` to 0 pixels (a 100000x10 image)."""
    height, width = processor.processed_size(image.shape[:2], do_resize)
    if height < 1 or width < 1:
        raise ValueError(f"a {image.shape[1]}x{image.shape[0]} image resized to the processor's size would be "
                         f"{width}x{height} pixels; crop it, or pass --no-resize")


def summary_line(name: str, anomaly_map: np.ndarray, threshold: float, scorer: str = DEFAULT_SCORER) -> str:
    """One line per image: size, max score on the scorer's scale and the share of pixels above the threshold."""
    summary = anomaly_summary(anomaly_map, threshold)
    height, width = anomaly_map.shape
    return (f"{name}: {width}x{height}, max score {summary['max_score']:.3f} ({get_scorer(scorer).scale}), "
            f"anomalous area {100 * summary['anomalous_fraction']:.2f}% (score > {threshold:g})")


# ------------------------------------------------------------------------------------------------------ model


DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def check_dtype_for_device(dtype: str, device: torch.device) -> None:
    """Reduced precision is for GPUs: on the CPU, torch's grid_sample gives wrong bfloat16 results for the pixel
    decoder's inputs (and is no faster), so `--dtype bfloat16/float16` with a CPU device is refused."""
    if dtype != "float32" and device.type == "cpu":
        raise ValueError(
            f"--dtype {dtype} needs a GPU: on the CPU, torch's grid_sample returns wrong values (even NaN) for "
            f"{dtype} inputs laid out as the pixel decoder lays them out, and is no faster; use --dtype float32 "
            "on the CPU"
        )


# ------------------------------------------------------------------------------------------------------ CLI


@dataclass
class _Loaded:
    path: Path
    stem: str
    image: np.ndarray


def _read_images(paths: Sequence[Path], stems: Sequence[str], report: Callable[[Path, str], None],
                 check: Callable[[np.ndarray], None] | None = None) -> Iterator[_Loaded]:
    """Read the images one at a time, in order; bad files (and those `check` refuses) are reported and skipped."""
    for path, stem in zip(paths, stems):
        try:
            image = np.asarray(load_image(path))
            if check is not None:
                check(image)
        except (ValueError, OSError, MemoryError) as err:
            report(path, str(err))
            continue
        yield _Loaded(path, stem, image)


def run(args: argparse.Namespace) -> int:
    """The command once its arguments are parsed (`cli.build_predict_parser`) and its threads set."""
    if args.batch_size < 1:
        print(f"mask2anomaly-predict: --batch-size must be at least 1; got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
        check_dtype_for_device(args.dtype, device)
    except ValueError as err:
        print(f"mask2anomaly-predict: {err}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        print(f"mask2anomaly-predict: --output-dir {output_dir} is a file; expected a folder (or a new name)",
              file=sys.stderr)
        return 2
    submission = None
    if args.format != "default":
        # benchmark submission layouts: the writers live with the evaluation code
        from mask2anomaly_eval.submission import SubmissionWriter

        try:
            submission = SubmissionWriter(args.format, output_dir, args.method, args.dataset)
        except (ValueError, ImportError) as err:
            print(f"mask2anomaly-predict: {err}", file=sys.stderr)
            return 2
    paths, problems = collect_inputs(args.inputs, exclude_dir=output_dir)
    if submission is not None:
        paths, skipped = submission.select(paths)
        problems += skipped
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not paths:
        print("mask2anomaly-predict: no input images", file=sys.stderr)
        return 1

    # the model first, the output folder after: a model that does not load leaves nothing behind
    try:
        model, processor = load_model_and_processor(args.model, device, DTYPES[args.dtype])
    except ModelNotFoundError as err:
        print(f"mask2anomaly-predict: --model: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        reason = " ".join(str(err).split())[:400]
        print(f"mask2anomaly-predict: cannot load the model {args.model!r}: {reason}", file=sys.stderr)
        return 2
    model.eval()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"mask2anomaly-predict: cannot create --output-dir {output_dir}: {err.strerror}", file=sys.stderr)
        return 2
    do_resize = False if args.no_resize else None  # None: the processor's own setting
    flip_tta = processor.flip_tta and not args.no_flip
    refine = processor.refine and not args.no_refine
    scorer = args.anomaly_scorer or processor.anomaly_scorer
    threshold = processor.decision_threshold(scorer) if args.anomaly_threshold is None else args.anomaly_threshold
    device, dtype = _input_placement(model, device)

    failures = len(problems)
    progress = tqdm(total=len(paths), desc="mask2anomaly-predict", unit="image", file=sys.stderr)

    def report(path: Path, reason: str) -> None:
        nonlocal failures
        failures += 1
        # the reason from load_image already names the file; say it once
        message = reason if os.fspath(path) in reason else f"{path}: {reason}"
        tqdm.write(f"error: {message}", file=sys.stderr)
        progress.update(1)

    def processed_size(item: _Loaded) -> tuple[int, int]:
        return processor.processed_size(item.image.shape[:2], do_resize)

    # the one batching of the path, so that a failed pass is reported per file
    images = _read_images(paths, output_stems(paths), report,
                          check=lambda image: check_resizable(processor, image, do_resize))
    for batch in batches_of_equal_size(images, args.batch_size, processed_size):
        try:
            predictions = predict_batch(model, processor, [item.image for item in batch], flip_tta, refine=refine,
                                        scorer=scorer, device=device, dtype=dtype, do_resize=do_resize)
        except (RuntimeError, ValueError, MemoryError) as err:
            for item in batch:
                report(item.path, f"prediction failed ({err})")
            continue
        for item, prediction in zip(batch, predictions):
            try:
                check_prediction(prediction)
            except ValueError as err:
                report(item.path, str(err))
                continue
            try:
                if submission is not None:
                    submission.write(item.path, prediction.anomaly_map, prediction.semantic_map)
                else:
                    write_outputs(output_dir, item.stem, item.image, prediction, scorer, threshold)
            except (OSError, ValueError) as err:
                report(item.path, f"could not write its outputs to {output_dir} ({err})")
                continue
            tqdm.write(summary_line(os.fspath(item.path), prediction.anomaly_map, threshold, scorer))
            progress.update(1)
        del predictions, batch
    progress.close()
    for warning in submission.warnings() if submission is not None else ():
        print(f"warning: {warning}", file=sys.stderr)
    if failures:
        print(f"mask2anomaly-predict: {failures} input(s) failed; outputs of the others are in {output_dir}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
