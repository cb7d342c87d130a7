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
- **Evaluation**: `Mask2AnomalyTrainer.evaluate` runs the project's one evaluation loop
  (`mask2anomaly_eval.loop.evaluate`) on every split of `data.validation` with the Trainer's accelerator: maps at
  the ORIGINAL image size (as the runner and `mask2anomaly_training.train` score them; not at the processed,
  i.e. resized and padded, size), streamed into pixel-metric accumulators that are merged across processes, and
  reported as ``eval_<split>_auprc``, ``eval_<split>_fpr95`` and ``eval_<split>_auroc`` through the Trainer's log
  and callbacks (`evaluate_splits`). The anomaly splits therefore never go through `Trainer.evaluation_loop` or the
  collator; `eval_do_concat_batches=False` stays so that `Trainer.predict` (which still uses `evaluation_loop`)
  would not concatenate its predictions.
- The optimiser and schedule are those of the accelerate script (AdamW with the backbone multiplier and
  detectron2's weight-decay groups, poly schedule), passed as `optimizers=`; gradients are clipped by the
  Trainer at `max_grad_norm`; a frozen backbone stays in eval mode (its BatchNorm statistics frozen) although
  the Trainer calls `model.train()` at every step; the augmentation's epoch follows the Trainer's epoch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations.integration_utils import TensorBoardCallback, default_logdir
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import speed_metrics
from transformers.utils import logging

from mask2anomaly_eval.loop import evaluate_splits
from modeling_mask2anomaly.atomic_io import write_text_atomically
from modeling_mask2anomaly.cli import apply_threads

from .cli import build_parser
from .collate import LABEL_NAMES, TrainingCollator
from .config import TrainingConfig, load_config
from .loop import resolve_mixed_precision, resolve_tracker
from .model import backbone_of, build_model, freeze_backbone
from .optim import parameter_groups, poly_schedule
from .sources import stage_data

logger = logging.get_logger(__name__)

#: the Trainer's arguments beside the model, as JSON (transformers writes them as the pickle training_args.bin)
TRAINING_ARGS_JSON = "training_args.json"


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
        eval_scorer, eval_refine, eval_flip_tta: anomaly scorer, refinement and flip TTA for evaluation (None: the
            processor's).
        eval_max_images: evaluate only the first N images of each split.
    """

    def __init__(self, *args, frozen_backbone: bool = False, eval_scorer: str | None = None,
                 eval_refine: bool | None = None, eval_flip_tta: bool | None = False,
                 eval_max_images: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # TensorBoard's callback only puts its events under output_dir when training starts; an evaluate() before
        # (or without) train() would write them into ./runs of the working folder
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = os.path.join(self.args.output_dir, default_logdir())
        self.frozen_backbone = frozen_backbone
        self.eval_scorer, self.eval_refine, self.eval_flip_tta = eval_scorer, eval_refine, eval_flip_tta
        self.eval_max_images = eval_max_images

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """`Trainer._save`, with the training arguments written as JSON (``training_args.json``) instead of the
        pickle ``training_args.bin``: a folder that is loaded unpickles nothing, so `mask2anomaly-publish` takes
        the final folder (and every checkpoint) as it is. (Resuming does not read the arguments back.)"""
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
            if os.path.exists(pickled):
                os.remove(pickled)
            write_text_atomically(os.path.join(output_dir, TRAINING_ARGS_JSON), self.args.to_json_string())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # `training_step` has just called model.train(); a frozen backbone must keep its BatchNorm statistics.
        if self.frozen_backbone and model.training:
            backbone_of(model).eval()
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """AuPRC, FPR95 and AUROC of an anomaly split (images with 0/1/255 labels) at the original image size,
        ``{metric_key_prefix}_auprc`` etc.; a mapping of splits is evaluated split by split, as in `Trainer`
        (``eval_<split>_auprc``). Logged and passed to the callbacks' ``on_evaluate``."""
        if eval_dataset is None or isinstance(eval_dataset, str):
            # `Trainer.evaluate` recurses over a dict of splits by name when no dataset was passed
            datasets = self.eval_dataset
            eval_dataset = datasets[eval_dataset] if isinstance(eval_dataset, str) else datasets
        if isinstance(eval_dataset, Mapping):
            metrics: dict[str, float] = {}
            for name, split in eval_dataset.items():
                metrics.update(self.evaluate(split, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        start = time.time()
        # `{prefix}` is the split's name for `evaluate_splits`: keys come back as `{prefix}_auprc` etc.
        metrics = evaluate_splits(
            self.model, self.processing_class, {metric_key_prefix: eval_dataset}, mode="exact",
            scorer=self.eval_scorer, refine=self.eval_refine, flip_tta=self.eval_flip_tta,
            batch_size=self.args.per_device_eval_batch_size, accelerator=self.accelerator,
            limit=self.eval_max_images, progress=not self.args.disable_tqdm,
        )
        metrics.update(speed_metrics(metric_key_prefix, start))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


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
    train_dataset, transform, validation = stage_data(config, stage, processor, num_labels=model.config.num_labels)

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
        data_collator=TrainingCollator(processor, outlier_labels=settings.outlier_exposure),
        train_dataset=train_dataset,
        eval_dataset=validation or None,
        processing_class=processor,
        optimizers=(optimizer, scheduler),
        callbacks=[AugmentationEpochCallback(transform)],
        frozen_backbone=settings.freeze_backbone,
        eval_scorer=run.eval_scorer,
        eval_refine=run.eval_refine,
        eval_flip_tta=run.eval_flip_tta,
        eval_max_images=run.eval_max_images,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mask2anomaly_training.trainer``: train one stage with the HF Trainer and save the model folder."""
    parser = build_parser(prog="python -m mask2anomaly_training.trainer", checkpoint_dir=False,
                          description="Train Mask2Anomaly with the HF Trainer (stage 1 closed set, stage 2 outlier "
                                      "exposure). Checkpoints go to OUTPUT_DIR/checkpoint-<step>.")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
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
