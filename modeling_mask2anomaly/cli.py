"""The light half of the command lines: argument parsers and the console entry points, with nothing heavier than
the standard library at import, so that ``--help`` and argument errors are instant.

Every entry point parses its arguments here, sets the thread count (`apply_threads`), and only then imports the
module that does the work (torch, transformers): `predict_main` -> `predict.run`, `convert_main` ->
`conversion.cli.run`, `backbone_main` -> `conversion.backbone.run`. The other packages' command
lines (`mask2anomaly_training.cli`, `mask2anomaly_eval.cli`, `mask2anomaly_model_cards.cli`) use the helpers of this
module: `HelpFormatter` (every default shown) and `add_threads_argument` / `apply_threads`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .scorers import ANOMALY_SCORERS, SCORERS

# ------------------------------------------------------------------------------------------------ shared helpers


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, `(default: X)`, unless the help text already says it or there is none to show
    (None, False of a switch, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS or "%(default)" in help_text
                or "default:" in help_text or (isinstance(default, (list, tuple)) and not default)):
            return help_text
        if action.required or (not action.option_strings and action.nargs not in ("?", "*")):
            return help_text
        return help_text + " (default: %(default)s)"


#: the most threads a command uses by default: more rarely pays on these networks' small tensors
MAX_DEFAULT_THREADS = 4


def default_threads() -> int:
    """The thread count commands use unless told: ``OMP_NUM_THREADS`` when set (e.g. by ``accelerate launch``),
    else half of the CPUs this process may run on, between 1 and `MAX_DEFAULT_THREADS`.

    torch's own default (one thread per core) makes every thread wait for the slowest one: on a CPU that other
    programs keep busy that was 7-10x slower than one thread; half the CPUs leaves room for them."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.strip().isdigit() and int(value) > 0:
        return int(value)
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_THREADS, available // 2))


def _thread_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 thread, got {value}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op threads (and OpenMP's, for libraries that start after it)."""
    parser.add_argument(
        "--threads", type=_thread_count, default=None, metavar="N",
        help=f"CPU threads of torch's operations (default: OMP_NUM_THREADS if set, else half the CPUs, at most "
             f"{MAX_DEFAULT_THREADS}; here {default_threads()})")


def apply_threads(threads: int | None) -> int:
    """Use `threads` (None: `default_threads()`) CPU threads; returns the number. Call it before the heavy work:
    it sets ``OMP_NUM_THREADS`` for what is imported afterwards (data-loader workers, OpenMP libraries) and torch's
    intra-op thread count."""
    threads = default_threads() if threads is None else int(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    return threads


# ------------------------------------------------------------------------------------------------ predict

#: names of the forward-pass precisions of ``--dtype`` (torch dtypes of the same name)
DTYPE_NAMES: tuple[str, ...] = ("bfloat16", "float16", "float32")
#: what can run the network in `mask2anomaly-predict` (the keys of `backends.BACKENDS`; a test holds them equal,
#: that module loads torch)
BACKEND_NAMES: tuple[str, ...] = ("torch", "onnxruntime", "openvino")
#: the output layouts of `mask2anomaly-predict`: its own files, or a benchmark's submission layout
OUTPUT_FORMATS: tuple[str, ...] = ("default", "smiyc", "fishyscapes")


def build_predict_parser() -> argparse.ArgumentParser:
    """The command line of `mask2anomaly-predict`."""
    parser = argparse.ArgumentParser(
        prog="mask2anomaly-predict", formatter_class=HelpFormatter,
        description="Anomaly maps (.npy), heatmaps and Cityscapes semantic maps (PNG) for road images.",
    )
    parser.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) and glob patterns")
    parser.add_argument("--model", required=True,
                        help="model folder or Hub id (a Hub id loads from the local cache when offline)")
    parser.add_argument("--output-dir", default="outputs/predict", help="where outputs go")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                        help="weights and activations of the forward pass on a GPU; pre- and post-processing stay "
                             "float32 (the CPU runs float32 only)")
    add_threads_argument(parser)
    parser.add_argument("--backend", choices=BACKEND_NAMES, default="torch",
                        help="what runs the network: torch (the model folder), onnxruntime or openvino (a folder "
                             "written by mask2anomaly-export; extras [onnx] / [openvino]); pre- and post-processing "
                             "are the same for all")
    parser.add_argument("--compile", action="store_true",
                        help="torch backend: run the model through torch.compile (the first image of each size "
                             "compiles, later ones are faster)")
    parser.add_argument("--num-processes", type=int, default=1, metavar="N",
                        help="shard the inputs across N processes on this machine, each image predicted once, the "
                             "outputs those of one process (or start the command with `accelerate launch`)")
    parser.add_argument("--no-refine", action="store_true", help="turn off mask refinement by confident stuff masks")
    parser.add_argument("--no-flip", action="store_true", help="turn off horizontal-flip test-time augmentation")
    parser.add_argument("--no-resize", action="store_true",
                        help="keep each image's own size (still padded to a multiple of 32)")
    parser.add_argument("--anomaly-scorer", "--scorer", dest="anomaly_scorer", choices=ANOMALY_SCORERS, default=None,
                        metavar="NAME", help=f"per-pixel anomaly score, one of {', '.join(ANOMALY_SCORERS)} "
                                             "(default: the processor's anomaly_scorer)")
    parser.add_argument("--anomaly-threshold", "--threshold", dest="anomaly_threshold", type=float, default=None,
                        metavar="VALUE",
                        help="anomaly decision threshold for the summary and the colour bar mark "
                             "(default: the processor's anomaly_threshold for its own scorer, the scorer's default "
                             "for another one: " + ", ".join(f"{name} {scorer.default_threshold:g}"
                                                           for name, scorer in SCORERS.items()) + ")")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="default",
                        help="output layout (default: %(default)s): default = .npy + heatmap + semantic PNG per "
                             "image; smiyc = the SegmentMeIfYouCan kit's <output-dir>/anomaly_p/<method>/<dataset>/"
                             "<frame>.hdf5; fishyscapes = <output-dir>/DDDD_anomaly.npy and DDDD_segmentation.npy "
                             "for inputs DDDD_*.png")
    parser.add_argument("--method", default=None, help="with --format smiyc: the method name of the output tree")
    parser.add_argument("--dataset", default=None,
                        help="with --format smiyc: the kit's dataset, e.g. AnomalyTrack-test, ObstacleTrack-test, "
                             "LostAndFound-testNoKnown")
    return parser


def predict_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mask2anomaly-predict` (see `predict`)."""
    args = build_predict_parser().parse_args(argv)
    apply_threads(args.threads)
    from .predict import run

    return run(args, argv)


# ------------------------------------------------------------------------------------------------ convert


def build_convert_parser() -> argparse.ArgumentParser:
    """The command line of `mask2anomaly-convert`."""
    parser = argparse.ArgumentParser(
        prog="mask2anomaly-convert", formatter_class=HelpFormatter,
        description="Convert an official detectron2 Mask2Anomaly checkpoint into a transformers model folder.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="official .pth / .pkl checkpoint")
    parser.add_argument("--config", required=True, type=Path, help="its detectron2 YAML config (_BASE_ is resolved)")
    parser.add_argument("--output-dir", required=True, type=Path, help="model folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    parser.add_argument("--verbose", action="store_true", help="log what was mapped, dropped and filled")
    return parser


def convert_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mask2anomaly-convert` (see `conversion.cli`)."""
    args = build_convert_parser().parse_args(argv)
    from .conversion.cli import run

    return run(args)


def build_backbone_parser() -> argparse.ArgumentParser:
    """The command line of `mask2anomaly-backbone`."""
    parser = argparse.ArgumentParser(
        prog="mask2anomaly-backbone", formatter_class=HelpFormatter,
        description="Check a ResNet backbone checkpoint (torchvision .pth, detectron2 .pkl, transformers "
                    ".safetensors) against a Mask2Anomaly ResNet and write it in transformers' names.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="e.g. Barlow Twins' resnet50.pth")
    parser.add_argument("--output", required=True, type=Path, help=".safetensors file to write")
    parser.add_argument("--depths", type=int, nargs=4, default=[3, 4, 6, 3], metavar="N",
                        help="blocks per stage (default ResNet-50: 3 4 6 3; ResNet-101: 3 4 23 3)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser


def backbone_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mask2anomaly-backbone` (see `conversion.backbone`)."""
    args = build_backbone_parser().parse_args(argv)
    from .conversion.backbone import run

    return run(args)


if __name__ == "__main__":
    sys.exit(predict_main())
