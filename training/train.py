"""The accelerate training script of Mask2Anomaly: stage 1 (closed set) and stage 2 (outlier exposure).

    mask2anomaly-train --config synthroad --stage 1 --output-dir runs/stage1
    mask2anomaly-train --config synthroad --stage 2 --init-from runs/stage1 --output-dir runs/stage2
    accelerate launch --multi_gpu --num_processes 2 -m mask2anomaly_training.train --config synthroad ...

(On a machine without GPUs the same `accelerate launch --multi_gpu` line runs the processes on the CPU with a
gloo process group; `accelerate launch --cpu --num_processes N` starts a single process unless MPI is set up.)

- **Stage 1** trains with the Mask2Former losses only (no outliers, no contrastive loss).
- **Stage 2** pastes outlier objects into the training images (probability `data.outlier_probability`, label
  254), passes `outlier_labels` so that the model adds its mask contrastive loss, and freezes the backbone.

Configs are YAML files (packaged ones: ``cityscapes`` with the official hyper-parameters, ``synthroad`` for CPU
runs); ``KEY=VALUE`` arguments override any entry (``stage1.max_steps=200 data.train.num=500``; a folder that
``mask2anomaly-synthroad`` wrote: ``data.train.source=folder data.train.root=data/synthroad/train``), see
`config`. The optimiser
is AdamW with a learning-rate multiplier on the backbone and no weight decay on norm and embedding parameters
(detectron2's Mask2Former optimiser), the schedule is poly, gradients are clipped on their norm over the full
model, and `batch_size` is the number of images per optimizer step over all processes and accumulation steps,
so a run gives the same batches whatever the number of processes.

Exact resumption: batches are drawn by a sampler that is a pure function of (seed, epoch, step), every
augmentation draws from a generator seeded by (seed, epoch, image index) (`transforms.sample_rng`), the data loader's workers do
not touch the global random state, and checkpoints (`checkpoint.save_checkpoint`: weights, optimizer, scheduler,
step, every random generator; safetensors, JSON and weights-only torch files, nothing that is unpickled) are
written to a temporary folder that is renamed when complete. A run killed at any point and restarted with
``--resume`` therefore continues exactly as if it had never stopped; a damaged checkpoint stops the run naming the
file and the previous checkpoint.

The output folder is a `save_pretrained` model folder with its image processor, `training_config.yaml` (the
resolved configuration and command) and `eval_results.json`.

This module is the command line and `train`, the orchestration; the parts live beside it: `config` (the
recipe and its overrides), `sources` (data sources, augmented training set, validation splits), `sampling`
(process-independent batches), `model` (model and processor to train, backbone helpers), `optim` (parameter
groups, poly schedule), `loop` (one optimizer step, accelerate settings), `checkpoint` (atomic checkpoints,
resumption) and `evaluation` (periodic validation).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers.utils import logging as hf_logging

from modeling_mask2anomaly.atomic_io import write_files_atomically

from .checkpoint import CheckpointError, TrainingProgress, load_checkpoint, resolve_resume, save_checkpoint
from .cli import build_parser, main  # noqa: F401  (`python -m mask2anomaly_training.train`; the Trainer route)
from .collate import TrainingCollator
from .config import TrainingConfig, load_config
from .evaluation import evaluate_anomaly
from .loop import (
    _launched_on_cpu_only,
    _progress_bar,
    _to_device,
    optimizer_step,
    resolve_mixed_precision,
    resolve_tracker,
    synchronise_buffers,
)
from .model import build_model, freeze_backbone, set_train_mode
from .optim import parameter_groups, poly_schedule
from .reporting import log_line, metrics_summary, quiet_library_logging, startup_summary, tracker_values
from .sampling import micro_batches
from .sources import TrainingDataError, stage_data

logger = get_logger(__name__)

TRAINING_CONFIG_NAME = "training_config.yaml"
EVAL_RESULTS_NAME = "eval_results.json"


class ResumeMismatchError(ValueError):
    """``--resume`` of a checkpoint whose stage or max_steps differ from the run's (the poly schedule's length
    would change): the message is one line naming both."""


def train(config: TrainingConfig, output_dir: str | os.PathLike, stage: int = 1, max_steps: int | None = None,
          resume: str | None = None, init_from: str | None = None, checkpoint_dir: str | os.PathLike | None = None,
          command: str | None = None) -> dict[str, Any]:
    """Train stage `stage` of `config`; write the model folder to `output_dir` and return the final metrics.

    Args:
        config: the recipe (see `load_config`).
        output_dir: receives the `save_pretrained` model and image processor, `training_config.yaml` and
            `eval_results.json`.
        stage: 1 (closed set) or 2 (outlier exposure, backbone frozen).
        max_steps: optimizer steps (and poly-schedule length); default the stage's `max_steps`.
        resume: ``"latest"`` (newest complete checkpoint in `checkpoint_dir`, or a fresh start when there is
            none) or a checkpoint folder.
        init_from: a model folder (a stage-1 `output_dir`) to start from; stage 2 normally needs one.
        checkpoint_dir: where checkpoints go; default ``output_dir/checkpoints``.
        command: the command line, recorded in `training_config.yaml`.
    """
    settings = copy.deepcopy(config.stage(stage))
    if max_steps is not None:
        settings.max_steps = int(max_steps)
    if settings.max_steps < 1:
        raise ValueError(f"max_steps={settings.max_steps}: expected at least 1")
    run = config.training
    output_dir = Path(output_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else output_dir / "checkpoints"
    tracker = resolve_tracker(run.report_to)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(run.mixed_precision), log_with=tracker,
                              project_dir=str(output_dir), cpu=_launched_on_cpu_only())
    per_process, remainder = divmod(settings.batch_size, accelerator.num_processes * settings.gradient_accumulation_steps)
    if remainder or per_process < 1:
        raise ValueError(
            f"stage{stage}.batch_size={settings.batch_size} must be a positive multiple of num_processes "
            f"({accelerator.num_processes}) x gradient_accumulation_steps ({settings.gradient_accumulation_steps})"
        )
    if stage == 2 and init_from is None:
        logger.warning("stage 2 without --init-from trains the outlier-exposure stage from a fresh model", main_process_only=True)

    # Same initial weights on every process (DDP would broadcast them anyway; this also makes runs repeatable).
    set_seed(run.seed)
    logger.info(f"stage {stage}: building the model" + (f" from {init_from}" if init_from else ""),
                main_process_only=True)
    model, processor = build_model(config, init_from)
    if settings.freeze_backbone:
        freeze_backbone(model)

    logger.info("preparing the data (rendered or read once, then reused from the datasets cache)",
                main_process_only=True)
    with accelerator.main_process_first():  # the first process builds the `datasets` caches, the others reuse them
        dataset, transform, validation = stage_data(config, stage, processor, num_labels=model.config.num_labels)

    optimizer = torch.optim.AdamW(parameter_groups(model, settings), lr=settings.learning_rate)
    scheduler = poly_schedule(optimizer, settings.max_steps, settings.poly_power)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is not prepared: accelerate would step it once per process. It is checkpointed as is.
    progress = TrainingProgress(stage=stage, max_steps=settings.max_steps)

    start = resolve_resume(resume, checkpoint_dir)
    if start is not None:
        load_checkpoint(accelerator, start, model, optimizer, scheduler, progress)
        if progress.stage != stage or progress.max_steps != settings.max_steps:
            raise ResumeMismatchError(
                f"--resume: checkpoint {start} belongs to stage {progress.stage} with max_steps {progress.max_steps}; "
                f"this run is stage {stage} with max_steps {settings.max_steps} (the schedule's length cannot change "
                f"mid-run: resume with --max-steps {progress.max_steps}, or train into a new --output-dir)")
        logger.info(f"resumed from {start} at step {progress.step}", main_process_only=True)
    elif resume == "latest":
        logger.info(f"no checkpoint in {checkpoint_dir}; starting from step 0", main_process_only=True)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        record = {"command": command, "stage": stage, "max_steps": settings.max_steps, "init_from": init_from,
                  "num_processes": accelerator.num_processes, "config": config.to_dict()}
        with open(output_dir / TRAINING_CONFIG_NAME, "w", encoding="utf-8") as handle:
            yaml.safe_dump(record, handle, sort_keys=False)
    tensorboard_dir = None
    if tracker is not None:
        # no `config=`: TensorBoard would write it as an hparams run of its own, empty of scalars; the recipe is in
        # training_config.yaml
        accelerator.init_trackers(f"mask2anomaly-stage{stage}")
        tensorboard_dir = str(output_dir / f"mask2anomaly-stage{stage}")
    if accelerator.is_main_process:
        logger.info(startup_summary(
            stage=stage, num_images=len(dataset), max_steps=settings.max_steps, start_step=progress.step,
            batch_size=settings.batch_size, per_process=per_process, num_processes=accelerator.num_processes,
            accumulation=settings.gradient_accumulation_steps, learning_rate=settings.learning_rate,
            output_dir=str(output_dir), checkpoint_dir=str(checkpoint_dir), tensorboard_dir=tensorboard_dir,
            validation=sorted(validation)))

    def run_evaluation() -> dict[str, float]:
        if not validation:
            return {}
        synchronise_buffers(accelerator, model)
        scores = evaluate_anomaly(model, processor, validation, accelerator, run.eval_max_images, run.eval_scorer,
                                  run.eval_flip_tta, run.eval_refine, run.eval_batch_size)
        set_train_mode(model, settings.freeze_backbone)
        return scores

    collator = TrainingCollator(processor, outlier_labels=settings.outlier_exposure)
    stream = micro_batches(dataset, transform, collator, settings, accelerator.process_index,
                           accelerator.num_processes, run.seed, progress.step, config.data.num_workers)
    set_train_mode(model, settings.freeze_backbone)
    window: dict[str, float] = {}
    window_steps, window_start = 0, time.perf_counter()
    bar = _progress_bar(accelerator, progress.step, settings.max_steps, stage)
    # the first batch waits for the data-loader workers and the first augmentations: say so on the bar
    bar.set_postfix_str("waiting for the first batch")
    accumulation = settings.gradient_accumulation_steps
    eval_keys: set[str] = set()
    with logging_redirect_tqdm():  # log lines above the bar, not glued onto it
        while progress.step < settings.max_steps:
            batches = [_to_device(next(stream), accelerator.device) for _ in range(accumulation)]
            for key, value in optimizer_step(model, batches, optimizer, scheduler, accelerator,
                                             settings.max_grad_norm).items():
                window[key] = window.get(key, 0.0) + value
            progress.step += 1
            window_steps += 1
            if window_steps == 1 and not progress.history:
                bar.set_postfix_str("", refresh=False)  # the first batch came
            bar.update(1)

            log: dict[str, float] = {}
            if progress.step % run.logging_steps == 0 or progress.step == settings.max_steps:
                means = torch.tensor([window[k] / window_steps for k in sorted(window)], device=accelerator.device)
                means = accelerator.reduce(means, reduction="mean")
                log = dict(zip(sorted(window), means.tolist()))
                log["lr"] = max(scheduler.get_last_lr())  # the head's rate (the backbone runs at a fraction)
                log["seconds_per_step"] = (time.perf_counter() - window_start) / window_steps
                window, window_steps, window_start = {}, 0, time.perf_counter()
                bar.set_postfix(loss=f"{log['loss']:.3f}")
            if run.eval_steps and progress.step % run.eval_steps == 0 and progress.step < settings.max_steps:
                scores = run_evaluation()
                eval_keys.update(scores)
                log.update(scores)
            if log:
                accelerator.log(tracker_values(log, eval_keys), step=progress.step)
                logger.info(log_line(progress.step, settings.max_steps, log, eval_keys), main_process_only=True)
                log["step"] = progress.step
                progress.history.append(log)
            if run.checkpoint_steps and progress.step % run.checkpoint_steps == 0:
                save_checkpoint(accelerator, checkpoint_dir, progress.step, run.save_total_limit, model,
                                optimizer, scheduler, progress)
    bar.close()

    final = run_evaluation()
    if final:
        accelerator.log(tracker_values(final, set(final)), step=progress.step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        results = {"stage": stage, "step": progress.step, "final": final, "history": progress.history}

        def write_model_folder(staging: Path) -> None:
            unwrapped.save_pretrained(staging)
            processor.save_pretrained(staging)
            (staging / EVAL_RESULTS_NAME).write_text(json.dumps(results, indent=2), encoding="utf-8")

        # staged and renamed file by file, config.json last: a kill never leaves a half-written file
        write_files_atomically(output_dir, write_model_folder, last=("config.json",))
        logger.info(f"stage {stage} done after {progress.step} steps: model in {output_dir}"
                    + (f"; {metrics_summary(final)}" if final else ""), main_process_only=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


# ======================================================================================================
# Command line
# ======================================================================================================
def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """The command once its arguments are parsed (`cli.build_parser`) and its threads set."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()  # "Writing model shards" at the end says nothing the summary does not
    quiet_library_logging()
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    command = " ".join(["mask2anomaly-train", *(sys.argv[1:] if argv is None else argv)])
    try:
        train(config, args.output_dir, stage=args.stage, max_steps=args.max_steps, resume=args.resume,
              init_from=args.init_from, checkpoint_dir=args.checkpoint_dir, command=command)
    except ResumeMismatchError as error:
        # every process finds the mismatch; one line, from the main process only, and the others wait for it (a
        # launcher stops the remaining processes when the first one exits)
        state = PartialState()
        if state.is_main_process:
            print(f"mask2anomaly-train: {error}", file=sys.stderr, flush=True)
        state.wait_for_everyone()
        return 2
    except (CheckpointError, TrainingDataError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
