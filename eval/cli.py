"""The light half of `mask2anomaly-eval`: its argument parser and entry point, importing nothing heavier than the
standard library (and this project's light `modeling_mask2anomaly.cli`), so that ``--help`` is instant; the work is
`mask2anomaly_eval.run.run`, imported after parsing."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from modeling_mask2anomaly.cli import HelpFormatter, add_threads_argument, apply_threads
from modeling_mask2anomaly.scorers import ANOMALY_SCORERS

#: the component-metric tracks, the keys of `mask2anomaly_eval.metrics.TRACK_SIZE_THRESHOLDS` (a test holds them
#: equal; that module loads transformers)
TRACKS: tuple[str, ...] = ("anomaly", "obstacle")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `mask2anomaly-eval`."""
    parser = argparse.ArgumentParser(
        prog="mask2anomaly-eval", formatter_class=HelpFormatter,
        description="Evaluate a Mask2Anomaly model on an anomaly-segmentation benchmark (AuPRC, FPR95, AUROC and "
                    "optionally SegmentMeIfYouCan component metrics). Multi-process with `accelerate launch`.")
    parser.add_argument("--model", help="model folder or Hub id (required unless --compare)")
    parser.add_argument("--benchmark", help="benchmark name (e.g. smiyc_ra21, fs_lostandfound, road_anomaly, "
                        "synthroad; required unless --compare)")
    parser.add_argument("--data-dir", help="the benchmark's local folder, in its official layout (required unless "
                        "--compare)")
    parser.add_argument("--output-dir", default="outputs/eval",
                        help="receives <benchmark>[-<split>][-<scorer>].json and .md, the per-image CSV and the curves "
                             "(the split: the data folder's for SynthRoad, e.g. synthroad-anomaly.json)")
    parser.add_argument("--compare", nargs="+", metavar="JSON", default=None,
                        help="instead of evaluating: one table (comparison.md, comparison.csv) of these result "
                             "records, models x benchmarks x scorers")
    parser.add_argument("--mode", choices=("exact", "smiyc"), default="exact",
                        help="pixel metrics: exact (scikit-learn values) or smiyc (the benchmark's binned curve)")
    parser.add_argument("--components", action="store_true", help="also compute sIoU, PPV and mean F1")
    parser.add_argument("--track", choices=TRACKS, default=None,
                        help="component track (size thresholds); default: the benchmark's (obstacle for smiyc_ro21 "
                             "and SynthRoad's obstacle split)")
    parser.add_argument("--no-flip", action="store_true", help="disable flip test-time augmentation")
    parser.add_argument("--no-refine", action="store_true", help="disable mask refinement")
    parser.add_argument("--anomaly-scorer", "--scorer", dest="anomaly_scorer", choices=(*ANOMALY_SCORERS, "all"),
                        default=None, help="anomaly scorer; 'all' scores every registered scorer from one pass over "
                                           "the frames (default: the processor's anomaly_scorer)")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="95%% intervals from N resamples of the images (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    parser.add_argument("--visualize", type=int, default=0, metavar="K",
                        help="heatmaps of the K worst and K best images by per-image AuPRC")
    parser.add_argument("--no-curves", action="store_true", help="do not write the PR/ROC curve PNGs and CSV")
    parser.add_argument("--anomaly-threshold", type=float, default=None,
                        help="with --components: score components at score > THRESHOLD instead of the pixel "
                             "curve's best-F1 threshold (the official protocol)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N images (the results then say so)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if an accelerator is available")
    add_threads_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mask2anomaly-eval`; returns 0, or 1 when some items failed (2 for usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    from .run import run

    return run(args, parser)


if __name__ == "__main__":
    raise SystemExit(main())
