"""Batches that do not depend on the number of processes: a global batch order that is a pure function of
(seed, epoch, step), split into per-process micro-batches, and the endless stream of one process's batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from .config import StageSettings


def global_batch_indices(num_samples: int, batch_size: int, seed: int, epoch: int, batch: int) -> list[int]:
    """Indices of global batch `batch` of `epoch`: consecutive slices of a permutation seeded by (seed, epoch).

    The last incomplete batch of an epoch is dropped, so every optimizer step sees `batch_size` images.
    """
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    order = torch.randperm(num_samples, generator=generator)
    return order[batch * batch_size : (batch + 1) * batch_size].tolist()


class ProcessBatchSampler:
    """Micro-batches of one process from global batch `start_batch` of `epoch` to the end of that epoch.

    A global batch of `batch_size` images is split into `num_processes` equal parts and each part into
    `accumulation` micro-batches; this process yields its micro-batches as lists of dataset indices.
    """

    def __init__(self, num_samples: int, batch_size: int, accumulation: int, process_index: int,
                 num_processes: int, seed: int, epoch: int, start_batch: int):
        self.num_samples, self.batch_size, self.accumulation = num_samples, batch_size, accumulation
        self.process_index, self.num_processes = process_index, num_processes
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        self.batches_per_epoch = num_samples // batch_size

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        per_process = self.batch_size // self.num_processes
        micro = per_process // self.accumulation
        for batch in range(self.start_batch, self.batches_per_epoch):
            indices = global_batch_indices(self.num_samples, self.batch_size, self.seed, self.epoch, batch)
            mine = indices[self.process_index * per_process : (self.process_index + 1) * per_process]
            for start in range(0, per_process, micro):
                yield mine[start : start + micro]


def micro_batches(dataset, transform: Any, collator: Any, settings: StageSettings, process_index: int, num_processes: int,
                  seed: int, start_step: int, num_workers: int) -> Iterator[dict[str, Any]]:
    """Endless stream of one process's micro-batches, beginning with those of optimizer step `start_step`.

    `dataset` and `transform` come from `training_dataset`; each epoch gets a fresh DataLoader so that its
    workers see the epoch set on the transform.
    """
    batches_per_epoch = len(dataset) // settings.batch_size
    if batches_per_epoch < 1:
        raise ValueError(f"the training set has {len(dataset)} images, fewer than one batch of {settings.batch_size}")
    epoch, start_batch = divmod(start_step, batches_per_epoch)
    while True:
        transform.set_epoch(epoch)
        sampler = ProcessBatchSampler(len(dataset), settings.batch_size, settings.gradient_accumulation_steps,
                                      process_index, num_processes, seed, epoch, start_batch)
        # The loader's own generator keeps worker seeding off the global torch RNG, whose state is checkpointed.
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(seed), persistent_workers=False,
                            prefetch_factor=4 if num_workers > 0 else None)
        yield from loader
        epoch, start_batch = epoch + 1, 0
