"""Many processes for `mask2anomaly-predict`: shard the inputs so that each image is predicted exactly once, in one
of the processes, with the outputs a single process would write.

Two ways to get the processes:

- ``accelerate launch [--cpu] --num_processes N -m modeling_mask2anomaly.predict ...`` (or torchrun): the
  launcher sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; `current_process` reads them through accelerate's
  `PartialState`, which also places each process on its own GPU (``cuda:LOCAL_RANK``) when there are GPUs;
- ``mask2anomaly-predict --num-processes N ...``: `launch` starts N copies of the command on this machine with
  those variables set (and ``OMP_NUM_THREADS`` = cores / N unless it is set), waits for them and returns the worst
  exit status; a copy that dies abnormally stops the others.

Each process takes one contiguous block of the sorted input list (`shard`): blocks keep images of one folder, and
so often of one size, together for batching, and their sizes differ by at most one image. Output names are decided
on the whole list before sharding, so they are those of one process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

#: the environment variables a launcher (accelerate launch, torchrun, `launch`) sets for each process
LAUNCH_VARIABLES: tuple[str, ...] = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                     "MASTER_PORT")


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


def launched_world_size() -> int:
    """The number of processes a launcher started (``WORLD_SIZE``), 1 when none did."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(1, int(value))
    except ValueError as err:
        raise ValueError(f"WORLD_SIZE={value!r} in the environment is not a number of processes") from err


def current_process(cpu: bool = True) -> ProcessInfo:
    """This process's place: from accelerate's `PartialState` when a launcher started several (``WORLD_SIZE`` > 1;
    `cpu=True` keeps the processes on the CPU, gloo), else the one process."""
    if launched_world_size() == 1:
        return ProcessInfo()
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    return ProcessInfo(state.process_index, state.num_processes, state.local_process_index)


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def worker_environment(index: int, count: int, port: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of process `index` of `count` started by `launch` (what accelerate launch / torchrun set)."""
    env = dict(os.environ if base is None else base)
    env.update(WORLD_SIZE=str(count), RANK=str(index), LOCAL_RANK=str(index), LOCAL_WORLD_SIZE=str(count),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // count))
    return env


def launch(module: str, argv: Sequence[str], num_processes: int, poll_s: float = 0.2) -> int:
    """
    Run `python -m module *argv` in `num_processes` processes on this machine (see `worker_environment`) and
    return the worst exit status. Exit statuses 0 and 1 are a worker's normal ends; any other (a crash, a signal)
    stops the remaining workers, since they would then wait on it.
    """
    if num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1; got {num_processes}")
    port = _free_port()
    command = [sys.executable, "-m", module, *argv]
    workers = [subprocess.Popen(command, env=worker_environment(i, num_processes, port)) for i in range(num_processes)]
    statuses: dict[int, int] = {}
    try:
        while len(statuses) < len(workers):
            for index, worker in enumerate(workers):
                if index in statuses or worker.poll() is None:
                    continue
                statuses[index] = worker.returncode
                if worker.returncode not in (0, 1):
                    for other in workers:
                        if other.poll() is None:
                            other.terminate()
            time.sleep(poll_s)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
    # a negative status (killed by a signal) is reported as 1 + 128-style positive code
    return max((code if code >= 0 else 128 - code) for code in statuses.values())


__all__ = [
    "LAUNCH_VARIABLES",
    "ProcessInfo",
    "current_process",
    "launch",
    "launched_world_size",
    "shard",
    "shard_bounds",
    "worker_environment",
]
