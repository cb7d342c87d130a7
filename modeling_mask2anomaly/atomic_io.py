"""Atomic file writes: a file is either absent or complete, never half-written (temp file beside it, rename).

One implementation for every writer of the project (predict outputs, SynthRoad PNGs, model cards, evaluation
results). Not part of the remote code.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(target: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write `target` through `write(file)` into a temporary file beside it, then rename it into place."""
    target = Path(target)
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as temp_file:
            write(temp_file)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open() would
        os.chmod(temp_name, 0o666 & ~_umask())
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def write_text_atomically(target: str | os.PathLike, text: str) -> None:
    """`write_atomically` for UTF-8 text."""
    write_atomically(target, lambda stream: stream.write(text.encode("utf-8")))


__all__ = ["write_atomically", "write_text_atomically"]
