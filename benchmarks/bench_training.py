"""Seconds per training step of stage 1 vs stage 2, and whether a step waits for its data.

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py                     # synthroad demo model, batch 8
    python benchmarks/bench_training.py --steps 5 --repeats 5 --num-workers 2 stage1.batch_size=4 ...

Both stages train the same initial model on batches of the same size, through the training script's own
pieces (`stage_data`, `micro_batches`, `optimizer_step`):

- ``stage1``: closed set, Mask2Former losses only, no outliers in the loader;
- ``stage2``: outlier pasting in the loader (probability `data.outlier_probability`), mask contrastive loss
  on, backbone frozen -- stage 2 as it runs;
- ``stage2-unfrozen`` (with ``--unfrozen``): the same with the backbone trained, which isolates the cost of
  the contrastive loss and of pasting from the saving of the frozen backbone.

Blocks of `--steps` steps alternate between the variants, `--repeats` times (after one warm-up block each), so
that a drift in machine load hits every variant alike. A step is timed in two parts: waiting in
``next(loader)`` for the batch (data) and the forward/backward/optimizer step (compute). The medians over all
timed steps are printed, with the stage2 / stage1 ratio of seconds per step (target <= 1.15) and the share of
steps whose data wait exceeded 5% of the step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from mask2anomaly_training.collate import TrainingCollator
from mask2anomaly_training.config import load_config
from mask2anomaly_training.loop import optimizer_step
from mask2anomaly_training.model import build_model, freeze_backbone, set_train_mode
from mask2anomaly_training.optim import parameter_groups, poly_schedule
from mask2anomaly_training.sampling import micro_batches
from mask2anomaly_training.sources import stage_data

TARGET_RATIO = 1.15


def build_variant(config, stage: int, freeze: bool, model, processor, num_workers: int, accelerator: Accelerator):
    """A model copy with its optimiser and an endless loader of the stage's batches."""
    settings = copy.deepcopy(config.stage(stage))
    settings.freeze_backbone = freeze
    model = copy.deepcopy(model)
    if freeze:
        freeze_backbone(model)
    set_train_mode(model, freeze)
    optimizer = torch.optim.AdamW(parameter_groups(model, settings), lr=settings.learning_rate)
    scheduler = poly_schedule(optimizer, 10**6, settings.poly_power)  # long: the rate barely moves
    dataset, transform, _ = stage_data(config, stage)
    collator = TrainingCollator(processor, outlier_labels=settings.outlier_exposure)
    stream = micro_batches(dataset, transform, collator, settings, accelerator.process_index,
                           accelerator.num_processes, config.training.seed, 0, num_workers)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "stream": stream,
            "settings": settings, "data": [], "compute": []}


def run_block(variant: dict, steps: int, accelerator: Accelerator, record: bool) -> None:
    for _ in range(steps):
        start = time.perf_counter()
        batches = [next(variant["stream"]) for _ in range(variant["settings"].gradient_accumulation_steps)]
        ready = time.perf_counter()
        optimizer_step(variant["model"], batches, variant["optimizer"], variant["scheduler"], accelerator,
                       variant["settings"].max_grad_norm)
        done = time.perf_counter()
        if record:
            variant["data"].append(ready - start)
            variant["compute"].append(done - ready)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="synthroad", help="training config (file or packaged name)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=4, help="timed blocks per variant (alternating)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per variant")
    parser.add_argument("--unfrozen", action="store_true", help="also time stage 2 with the backbone trained")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)

    config = load_config(args.config, args.overrides)
    if config.stage1.batch_size != config.stage2.batch_size:
        config.stage2.batch_size = config.stage1.batch_size  # same batch for both stages
    config.data.validation = {}
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(config.training.seed)
    model, processor = build_model(config)
    model.to(accelerator.device)
    plan = [("stage1", 1, False), ("stage2", 2, True)] + ([("stage2-unfrozen", 2, False)] if args.unfrozen else [])
    variants = {name: build_variant(config, stage, freeze, model, processor, args.num_workers, accelerator)
                for name, stage, freeze in plan}
    print(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, batch "
          f"{config.stage1.batch_size} of {config.data.crop_size[0]}x{config.data.crop_size[1]}, "
          f"{args.num_workers} loader workers, {torch.get_num_threads()} torch threads, "
          f"outlier probability {config.data.outlier_probability}, device {accelerator.device}")

    for variant in variants.values():  # warm-up: worker start-up, allocator, first-call costs
        run_block(variant, max(2, args.steps // 2), accelerator, record=False)
    for _ in range(args.repeats):
        for variant in variants.values():
            run_block(variant, args.steps, accelerator, record=True)

    medians = {}
    print(f"{'variant':<16} {'s/step':>8} {'compute':>8} {'data wait':>10} {'steps waiting':>14}")
    for name, variant in variants.items():
        totals = [d + c for d, c in zip(variant["data"], variant["compute"])]
        waiting = sum(d > 0.05 * t for d, t in zip(variant["data"], totals))
        medians[name] = statistics.median(totals)
        print(f"{name:<16} {medians[name]:8.3f} {statistics.median(variant['compute']):8.3f} "
              f"{statistics.median(variant['data']):10.4f} {waiting:>8d} / {len(totals):<4d}")
    ratio = medians["stage2"] / medians["stage1"]
    print(f"stage2 / stage1 = {ratio:.3f} (target <= {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'NOT met'})")
    if "stage2-unfrozen" in medians:
        print(f"stage2-unfrozen / stage1 = {medians['stage2-unfrozen'] / medians['stage1']:.3f} "
              f"(contrastive loss + pasting, backbone trained)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
