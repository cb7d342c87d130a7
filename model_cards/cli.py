"""The light half of `mask2anomaly-publish`: its argument parser and entry point, importing nothing heavier than the
standard library, so that ``--help`` is instant; the work is `mask2anomaly_model_cards.publish.run`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from modeling_mask2anomaly.cli import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    """The command line of `mask2anomaly-publish`."""
    parser = argparse.ArgumentParser(
        prog="mask2anomaly-publish", formatter_class=HelpFormatter,
        description="Assemble a Mask2Anomaly model folder into a complete Hub repository (safetensors weights, "
                    "remote code, handler, model card with results and widget examples), check that it loads "
                    "without this package, and upload it.")
    parser.add_argument("model_dir", help="a save_pretrained Mask2Anomaly folder")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--results", nargs="*", default=[], help="mask2anomaly-eval JSON files for the card")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="only write the folder (to --output-dir)")
    parser.add_argument("--output-dir", help="keep the assembled folder here (required with --dry-run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier output in --output-dir (e.g. for a second dry run)")
    parser.add_argument("--widget-image", action="append", default=[], help="widget example image (repeatable; "
                        "default: two SynthRoad scenes)")
    parser.add_argument("--handler", help="Inference Endpoints handler (default: the package's "
                                          "modeling_mask2anomaly/handler.py)")
    parser.add_argument("--license", default="apache-2.0", help="license of the weights (Hub identifier)")
    parser.add_argument("--base-model", help="Hub id of the model this one was fine-tuned from")
    parser.add_argument("--dataset", action="append", default=[], help="Hub id of a training dataset (repeatable)")
    parser.add_argument("--commit-message", help="commit message of the upload")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mask2anomaly-publish`; returns 0 on success, 1 when the folder cannot be published."""
    args = build_parser().parse_args(argv)
    from .publish import run

    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
