"""`mask2anomaly-convert`: the command line of the converter (its parser: `modeling_mask2anomaly.cli`, light)."""

from __future__ import annotations

import argparse
import sys
import time

from transformers.utils import logging

from ..cli import build_convert_parser
from ..configuration_mask2anomaly import Mask2AnomalyConfig
from .detectron2_config import Detectron2ConfigError
from .errors import ConversionError
from .writing import convert_checkpoint


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mask2anomaly-convert`; returns 0 on success, 1 with a one-line error otherwise."""
    return run(build_convert_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The command once its arguments are parsed (`modeling_mask2anomaly.cli.build_convert_parser`)."""
    logging.set_verbosity_info() if args.verbose else logging.set_verbosity_warning()
    # one summary line is the whole output; transformers' "Writing model shards" bar is noise here
    logging.disable_progress_bar()
    start = time.perf_counter()
    try:
        output = convert_checkpoint(args.checkpoint, args.config, args.output_dir, overwrite=args.overwrite)
    except (ConversionError, Detectron2ConfigError, OSError) as error:
        print(f"mask2anomaly-convert: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    config = Mask2AnomalyConfig.from_pretrained(output)
    size = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    print(
        f"converted {args.checkpoint} -> {output} ({config.backbone_config.model_type}, {config.num_labels} classes, "
        f"{config.num_queries} queries, {config.decoder_layers - 1} decoder layers, "
        f"GMA {'on' if config.global_masked_attention else 'off'}, {size / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main"]
