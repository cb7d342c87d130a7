"""What a training run tells the person who started it: the start-up summary, the log lines of the loop, the
TensorBoard tags and the final summary. Log lines go through `logging` and are written above the progress bar
(`tqdm.contrib.logging.logging_redirect_tqdm` around the loop), never glued onto it."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

#: evaluation metrics, as `evaluate_anomaly` names them (``<split>_<metric>``), and how people call them
EVAL_METRICS: dict[str, str] = {"auprc": "AuPRC", "fpr95": "FPR95", "auroc": "AUROC"}
#: loop values that are not losses, and the TensorBoard group of each
TIMING_KEYS: dict[str, str] = {"lr": "lr/head", "seconds_per_step": "time/seconds_per_step"}


def _split_metric(key: str) -> tuple[str, str] | None:
    split, _, metric = key.rpartition("_")
    return (split, metric) if split and metric in EVAL_METRICS else None


def tracker_values(log: Mapping[str, float], eval_keys: set[str] | frozenset[str] = frozenset()) -> dict[str, float]:
    """The values of one log entry under grouped TensorBoard tags: ``loss/total``, ``loss/<term>``, ``lr/head``,
    ``time/seconds_per_step`` and ``eval/<split>_<metric>`` (for the keys in `eval_keys`); the step is the
    x axis, not a scalar of its own."""
    tags: dict[str, float] = {}
    for key, value in log.items():
        if key == "step":
            continue
        if key in TIMING_KEYS:
            tags[TIMING_KEYS[key]] = value
        elif key in eval_keys:
            tags[f"eval/{key}"] = value
        else:  # the total and its terms: loss/total, loss/cross_entropy, loss/dice, loss/mask, loss/contrastive
            tags["loss/total" if key == "loss" else f"loss/{key.removeprefix('loss_')}"] = value
    return tags


def _number(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4g}"


def log_line(step: int, max_steps: int, log: Mapping[str, float], eval_keys: set[str] | frozenset[str] = frozenset()
             ) -> str:
    """One line per logging step: ``step 25/1300: loss 41.2, loss_ce 1.93, ..., lr 0.002, 1.02 s/step``, then the
    evaluation metrics (in %) when the step evaluated."""
    losses = ", ".join(f"{key} {_number(value)}" for key, value in log.items()
                       if key not in TIMING_KEYS and key not in eval_keys and key != "step")
    parts = [f"step {step}/{max_steps}: {losses}" if losses else f"step {step}/{max_steps}:"]
    if "lr" in log:
        parts.append(f"lr {log['lr']:.3g}")
    if "seconds_per_step" in log:
        parts.append(f"{log['seconds_per_step']:.2f} s/step")
    line = ", ".join(parts)
    metrics = metrics_summary({key: log[key] for key in eval_keys if key in log})
    return f"{line}; {metrics}" if metrics else line


def metrics_summary(values: Mapping[str, float]) -> str:
    """Evaluation metrics of every split, in %: ``anomaly: AuPRC 39.90, FPR95 100.00, AUROC 81.20 (%)``; splits
    separated by ``; ``. Keys that are not ``<split>_<metric>`` are left out."""
    order = list(EVAL_METRICS)
    parsed = sorted((split_metric + (value,) for key, value in values.items()
                     if (split_metric := _split_metric(key)) is not None), key=lambda x: (x[0], order.index(x[1])))
    splits: dict[str, list[str]] = {}
    for split, metric, value in parsed:
        text = "–" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"
        splits.setdefault(split, []).append(f"{EVAL_METRICS[metric]} {text}")
    return "; ".join(f"{split}: {', '.join(parts)} (%)" for split, parts in splits.items())


def startup_summary(*, stage: int, num_images: int, max_steps: int, start_step: int, batch_size: int,
                    per_process: int, num_processes: int, accumulation: int, learning_rate: float,
                    output_dir: str, checkpoint_dir: str, tensorboard_dir: str | None, validation: list[str]) -> str:
    """The few lines a run starts with: what it trains on, for how long, on how many processes, and where
    everything goes."""
    lines = [
        f"stage {stage}: {num_images} training images, steps {start_step + 1}..{max_steps} of {max_steps}, "
        f"{batch_size} images per step ({num_processes} process(es) x {per_process} per process x {accumulation} "
        f"accumulation), learning rate {learning_rate:g}",
        f"model -> {output_dir}; checkpoints -> {checkpoint_dir}",
        f"TensorBoard -> {tensorboard_dir} (tensorboard --logdir {tensorboard_dir})" if tensorboard_dir
        else "TensorBoard: off (pip install tensorboard, or training.report_to=none to say so)",
        f"validation splits: {', '.join(validation)}" if validation else "validation: none",
    ]
    return "\n".join(lines)


def quiet_library_logging() -> None:
    """accelerate logs several INFO lines for every checkpoint it saves or loads: warnings only."""
    logging.getLogger("accelerate").setLevel(logging.WARNING)


__all__ = ["EVAL_METRICS", "TIMING_KEYS", "log_line", "metrics_summary", "quiet_library_logging", "startup_summary",
           "tracker_values"]
