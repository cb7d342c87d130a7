"""Many processes for `mask2anomaly-predict`: shard the inputs so that each image is predicted exactly once, in one
of the processes, with the outputs a single process would write.

Two ways to get the processes:

- ``accelerate launch --multi_gpu --num_processes N -m modeling_mask2anomaly.predict ...`` (accelerate's
  torchrun launcher; it runs CPU-only processes too) or ``torchrun --nproc-per-node N -m ...``: the launcher sets
  ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``, which `current_process` reads; on GPUs each process takes
  ``cuda:LOCAL_RANK``;
- ``mask2anomaly-predict --num-processes N ...``: `launch` starts N copies of the command on this machine with
  those variables set (and ``OMP_NUM_THREADS`` = cores / N unless it is set), waits for them and returns the worst
  exit status.

Each process takes one contiguous block of the sorted input list (`shard`): blocks keep images of one folder, and
so often of one size, together for batching, and their sizes differ by at most one image. Output names are decided
on the whole list before sharding, so they are those of one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands among those sharing the inputs: `index` of `count` (0-based), and its index on
    this machine (`local_index`, which GPU it takes)."""

    index: int = 0
    count: int = 1
    local_index: int = 0

    @property
    def is_main(self) -> bool:
        return self.index == 0


# the variables each launcher sets: torchrun / accelerate launch / `launch`, then MPI (accelerate's multi-CPU route)
_WORLD_SIZE = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_LOCAL_RANK = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def _env_int(names: Sequence[str], default: int) -> int:
    for name in names:
        if name in os.environ:
            value = os.environ[name]
            try:
                return int(value)
            except ValueError as err:
                raise ValueError(f"{name}={value!r} in the environment is not a whole number") from err
    return default


def launched_world_size() -> int:
    """The number of processes a launcher started (``WORLD_SIZE`` or its MPI equivalents), 1 when none did."""
    return max(1, _env_int(_WORLD_SIZE, 1))


def current_process() -> ProcessInfo:
    """
    This process's place among those a launcher started, from the variables it sets (``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK`` of torchrun, accelerate launch and `launch`, or their MPI equivalents), else the one process.

    The processes never talk to each other (each writes its own files), so no process group is set up: nothing to
    wait on when one of them fails, and no accelerate needed in an inference-only install.
    """
    count = launched_world_size()
    if count == 1:
        return ProcessInfo()
    index = _env_int(_RANK, -1)
    if not 0 <= index < count:
        raise ValueError(f"the launcher started {count} processes but this one's RANK is {index}; expected 0 to "
                         f"{count - 1}")
    return ProcessInfo(index, count, max(0, _env_int(_LOCAL_RANK, index)))


def shard_bounds(length: int, index: int, count: int) -> tuple[int, int]:
    """[start, end) of block `index` of `count` contiguous blocks covering `length` items; the first
    `length % count` blocks hold one item more."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} does not exist; expected 0 <= index < count")
    base, extra = divmod(length, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """Block `index` of `count` of `items` (see `shard_bounds`); the blocks of all indices partition `items`."""
    start, end = shard_bounds(len(items), index, count)
    return list(items[start:end])


def worker_environment(index: int, count: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of process `index` of `count` started by `launch`: the ranks torchrun / accelerate launch set
    (no rendezvous address: the processes never form a process group)."""
    env = dict(os.environ if base is None else base)
    env.update(WORLD_SIZE=str(count), RANK=str(index), LOCAL_RANK=str(index), LOCAL_WORLD_SIZE=str(count))
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // count))
    return env


def launch(module: str, argv: Sequence[str], num_processes: int) -> int:
    """
    Run `python -m module *argv` in `num_processes` processes on this machine (see `worker_environment`), wait for
    all of them and return the worst exit status (a process killed by signal N counts as 128 + N). A process that
    fails does not stop the others: they share nothing, so their shards are still worth finishing.
    """
    if num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1; got {num_processes}")
    command = [sys.executable, "-m", module, *argv]
    workers = [subprocess.Popen(command, env=worker_environment(i, num_processes)) for i in range(num_processes)]
    try:
        statuses = [worker.wait() for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:  # interrupted: do not leave orphans
                worker.kill()
                worker.wait()
    return max(code if code >= 0 else 128 - code for code in statuses)


__all__ = [
    "ProcessInfo",
    "current_process",
    "launch",
    "launched_world_size",
    "shard",
    "shard_bounds",
    "worker_environment",
]
