"""The light half of `mask2anomaly-train` (and of the HF Trainer route's command line): the argument parser and the
entry point, with nothing heavier than the standard library, PyYAML and OmegaConf at import, so that ``--help`` is
instant; the work (`train.run`, `trainer.run`) is imported after parsing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from modeling_mask2anomaly.cli import HelpFormatter, add_threads_argument, apply_threads

from .config import is_override


class TrainingArgumentParser(argparse.ArgumentParser):
    """`argparse` with two fixes for this command line: ``--resume`` followed by a ``key=value`` override means
    ``--resume latest`` (the override is not taken for a checkpoint path), and overrides may come before and
    after options (`parse_intermixed_args`)."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                   ) -> argparse.Namespace:
        words = list(sys.argv[1:] if args is None else args)
        fixed: list[str] = []
        for index, word in enumerate(words):
            fixed.append(word)
            if word == "--resume" and index + 1 < len(words) and is_override(words[index + 1]):
                fixed.append("latest")
        return self.parse_intermixed_args(fixed, namespace)


def build_parser(prog: str = "mask2anomaly-train", description: str | None = None,
                 checkpoint_dir: bool = True) -> TrainingArgumentParser:
    """The command line of `mask2anomaly-train` (also used by the Trainer route, without ``--checkpoint-dir``)."""
    parser = TrainingArgumentParser(
        prog=prog, formatter_class=HelpFormatter,
        description=description or (
            "Train Mask2Anomaly: stage 1 (closed set) or stage 2 (outlier exposure). Also runs under "
            "`accelerate launch -m mask2anomaly_training.train` for several processes."),
    )
    parser.add_argument("--config", default="synthroad",
                        help="YAML config file or packaged config name (cityscapes, synthroad)")
    parser.add_argument("--output-dir", required=True, help="folder for the trained model (save_pretrained)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1, help="1: closed set; 2: outlier exposure")
    parser.add_argument("--init-from", default=None, help="model folder to start from (stage 2: the stage-1 output)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="optimizer steps (default: the stage's max_steps in the config)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the newest checkpoint (or from the given checkpoint folder)")
    if checkpoint_dir:
        parser.add_argument("--checkpoint-dir", default=None,
                            help="where checkpoints go (default: OUTPUT_DIR/checkpoints)")
    add_threads_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. stage1.learning_rate=2e-4 data.train.num=500")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mask2anomaly-train`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    from .train import run

    return run(args, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
