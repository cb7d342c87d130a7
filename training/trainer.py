"""The HF Trainer route for Mask2Anomaly: the same recipe as `mask2anomaly_training.train`, run by
`transformers.Trainer`.

    python -m mask2anomaly_training.trainer --config synthroad --stage 1 --output-dir runs/trainer-stage1
    python -m mask2anomaly_training.trainer --config synthroad --stage 2 --init-from runs/trainer-stage1 \\
        --output-dir runs/trainer-stage2

or from Python::

    trainer = build_trainer(load_config("synthroad"), "runs/trainer-stage1", stage=1)
    trainer.train()
    trainer.save_model()          # model + image processor (the trainer's processing_class)

What the Trainer needs for Mask2Former-style models, and how it is set here:

- **Collator.** Every image has its own number of masks, so `pixel_values`, `pixel_mask` and `outlier_labels`
  are stacked but `mask_labels` and `class_labels` stay lists (`collate.TrainingCollator`); `outlier_labels` is
  left out in stage 1 so that no contrastive loss is added.
- **`remove_unused_columns=False`**: the augmentation runs as a `datasets` transform and needs the raw
  ``image``/``label``/``sample_index`` columns, which are not arguments of the model.
- **`label_names=["mask_labels", "class_labels", "outlier_labels"]`**: the model's label arguments.
- **`eval_do_concat_batches=False`** and **`batch_eval_metrics=True`**: anomaly maps are scored batch by batch
  into a streaming accumulator (`mask2anomaly_eval.pixel_metrics.PixelMetricAccumulator`) instead of being
  concatenated, so evaluation memory does not grow with the split.
- **Evaluation hook**: `Mask2AnomalyTrainer.prediction_step` turns the model outputs of an anomaly test batch
  into anomaly maps with the image processor's `post_process_anomaly_segmentation`, and `AnomalyMetrics`
  (the `compute_metrics`) reports ``eval_<split>_auprc``, ``eval_<split>_fpr95`` and ``eval_<split>_auroc``
  for every split of `data.validation`. Maps are scored at the processed resolution (SynthRoad: the
  original one); `mask2anomaly_training.evaluation.evaluate_anomaly` scores at the original size.
- The optimiser and schedule are those of the accelerate script (AdamW with the backbone multiplier and
  detectron2's weight-decay groups, poly schedule), passed as `optimizers=`; gradients are clipped by the
  Trainer at `max_grad_norm`; a frozen backbone stays in eval mode (its BatchNorm statistics frozen) although
  the Trainer calls `model.train()` at every step; the augmentation's epoch follows the Trainer's epoch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import EvalPrediction
from transformers.utils import logging

from .collate import LABEL_NAMES, AnomalyEvaluationCollator, TrainingCollator
from .config import TrainingConfig, load_config
from .loop import resolve_mixed_precision, resolve_tracker
from .model import backbone_of, build_model, freeze_backbone
from .optim import parameter_groups, poly_schedule
from .sources import stage_data
from .train import build_parser
from .transforms import SAMPLE_INDEX_COLUMN

logger = logging.get_logger(__name__)


class RoutingCollator:
    """One `data_collator` for both kinds of batches the Trainer builds: augmented training rows (they carry the
    `sample_index` column of `transforms.TrainTransform`) go to `TrainingCollator`, anomaly test rows (image +
    0/1/255 label) to `AnomalyEvaluationCollator`."""

    def __init__(self, train_collator: TrainingCollator, eval_collator: AnomalyEvaluationCollator):
        self.train_collator, self.eval_collator = train_collator, eval_collator

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self.train_collator(rows) if SAMPLE_INDEX_COLUMN in rows[0] else self.eval_collator(rows)


class AnomalyMetrics:
    """`compute_metrics` for `batch_eval_metrics=True`: accumulates (anomaly map, label) pairs batch by batch
    and returns ``auprc``, ``fpr95`` and ``auroc`` (fractions, void 255 ignored) on the last batch."""

    def __init__(self) -> None:
        from mask2anomaly_eval.pixel_metrics import PixelMetricAccumulator

        self._new = lambda: PixelMetricAccumulator("exact")
        self.accumulator = self._new()

    def __call__(self, prediction: EvalPrediction, compute_result: bool = True) -> dict[str, float]:
        maps = prediction.predictions
        labels = prediction.label_ids
        maps = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
        labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        for anomaly_map, label in zip(maps, labels):
            self.accumulator.add(anomaly_map, label)
        if not compute_result:
            return {}
        scores = self.accumulator.compute()
        self.accumulator = self._new()
        return {key: float(scores[key]) for key in ("auprc", "fpr95", "auroc")}


class AugmentationEpochCallback(TrainerCallback):
    """Sets the augmentation's epoch at the start of every Trainer epoch (before the epoch's DataLoader
    iterator, and so its workers, are created), so that each epoch sees new crops, flips and pastes."""

    def __init__(self, transform: Any):
        self.transform = transform

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.transform.set_epoch(int(state.epoch or 0))


class Mask2AnomalyTrainer(Trainer):
    """`Trainer` with anomaly evaluation and an optionally frozen backbone.

    Args (besides `Trainer`'s):
        frozen_backbone: keep the backbone in eval mode during training (stage 2).
        eval_scorer, eval_refine: anomaly scorer and refinement for evaluation (default: the processor's).
    """

    def __init__(self, *args, frozen_backbone: bool = False, eval_scorer: str | None = None,
                 eval_refine: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.frozen_backbone = frozen_backbone
        self.eval_scorer, self.eval_refine = eval_scorer, eval_refine

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # `training_step` has just called model.train(); a frozen backbone must keep its BatchNorm statistics.
        if self.frozen_backbone and model.training:
            backbone_of(model).eval()
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Anomaly test batches (with `anomaly_labels`) -> `(None, anomaly maps (B, Hp, Wp), anomaly_labels)`;
        anything else goes to `Trainer.prediction_step`."""
        if "anomaly_labels" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
        maps = self.processing_class.post_process_anomaly_segmentation(
            outputs, scorer=self.eval_scorer, refine=self.eval_refine
        )
        return None, torch.stack(maps), inputs["anomaly_labels"]


def build_trainer(config: TrainingConfig, output_dir: str | os.PathLike, stage: int = 1,
                  init_from: str | None = None, max_steps: int | None = None,
                  **argument_overrides: Any) -> Mask2AnomalyTrainer:
    """A `Mask2AnomalyTrainer` for stage `stage` of `config`, writing to `output_dir`.

    `batch_size` of the stage is the number of images per optimizer step; the per-device batch is derived from it
    with the number of processes (``WORLD_SIZE``) and `gradient_accumulation_steps`. `argument_overrides` are
    passed to `TrainingArguments` last (e.g. ``save_strategy="no"``).
    """
    settings = config.stage(stage)
    run = config.training
    max_steps = settings.max_steps if max_steps is None else int(max_steps)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_device, remainder = divmod(settings.batch_size, world_size * settings.gradient_accumulation_steps)
    if remainder or per_device < 1:
        raise ValueError(f"stage{stage}.batch_size={settings.batch_size} must be a positive multiple of WORLD_SIZE "
                         f"({world_size}) x gradient_accumulation_steps ({settings.gradient_accumulation_steps})")

    torch.manual_seed(run.seed)  # same initial weights as the accelerate script for the same seed
    model, processor = build_model(config, init_from)
    if settings.freeze_backbone:
        freeze_backbone(model)
    train_dataset, transform, validation = stage_data(config, stage, processor)

    optimizer = torch.optim.AdamW(parameter_groups(model, settings), lr=settings.learning_rate)
    scheduler = poly_schedule(optimizer, max_steps, settings.poly_power)
    precision = resolve_mixed_precision(run.mixed_precision)
    tracker = resolve_tracker(run.report_to)
    evaluate = bool(validation) and run.eval_steps > 0
    arguments = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=run.eval_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        max_grad_norm=settings.max_grad_norm or 0.0,
        remove_unused_columns=False,
        label_names=list(LABEL_NAMES),
        eval_do_concat_batches=False,
        batch_eval_metrics=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=run.eval_steps if evaluate else None,
        save_strategy="steps" if run.checkpoint_steps else "no",
        save_steps=run.checkpoint_steps or 500,
        save_total_limit=run.save_total_limit,
        logging_steps=run.logging_steps,
        seed=run.seed,
        dataloader_num_workers=config.data.num_workers,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        report_to=[tracker] if tracker else "none",
    )
    arguments.update(argument_overrides)
    return Mask2AnomalyTrainer(
        model=model,
        args=TrainingArguments(**arguments),
        data_collator=RoutingCollator(TrainingCollator(processor, outlier_labels=settings.outlier_exposure),
                                      AnomalyEvaluationCollator(processor)),
        train_dataset=train_dataset,
        eval_dataset=validation or None,
        processing_class=processor,
        compute_metrics=AnomalyMetrics() if validation else None,
        optimizers=(optimizer, scheduler),
        callbacks=[AugmentationEpochCallback(transform)],
        frozen_backbone=settings.freeze_backbone,
        eval_scorer=run.eval_scorer,
        eval_refine=run.eval_refine,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mask2anomaly_training.trainer``: train one stage with the HF Trainer and save the model folder."""
    parser = build_parser(prog="python -m mask2anomaly_training.trainer", checkpoint_dir=False,
                          description="Train Mask2Anomaly with the HF Trainer (stage 1 closed set, stage 2 outlier "
                                      "exposure). Checkpoints go to OUTPUT_DIR/checkpoint-<step>.")
    args = parser.parse_args(argv)
    logging.set_verbosity_info()
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    trainer = build_trainer(config, args.output_dir, stage=args.stage, init_from=args.init_from,
                            max_steps=args.max_steps)
    resume = None if args.resume is None else (True if args.resume == "latest" else args.resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    if trainer.eval_dataset:
        trainer.evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
