"""Atomic file writes: a file is either absent or complete, never half-written (temp file beside it, rename).

One implementation for every writer of the project (predict outputs, SynthRoad PNGs, model cards, evaluation
results). Not part of the remote code.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
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


def write_files_atomically(target_dir: str | os.PathLike, write: Callable[[Path], None],
                           last: Sequence[str] = ()) -> list[Path]:
    """Let `write(staging)` fill a temporary folder inside `target_dir`, then rename each file it wrote into
    `target_dir` (the names in `last` after the others, e.g. ``config.json``, so that a folder whose last file is
    there holds the other files of the same write). Every file is either the old one or a complete new one, with
    the permissions a plain open() gives (0666 less the umask); on any failure nothing is renamed and the staging
    folder is removed. Returns the paths written in `target_dir`, in the order they were renamed."""
    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target_dir, prefix=".staging-"))
    try:
        write(staging)
        names = sorted(path.name for path in staging.iterdir())
        subfolders = [name for name in names if not (staging / name).is_file() or (staging / name).is_symlink()]
        if subfolders:
            raise ValueError(f"write_files_atomically stages plain files only; got {subfolders}")
        names = [name for name in names if name not in last] + [name for name in last if name in names]
        mode = 0o666 & ~_umask()
        for name in names:
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(staging / name, mode)
        written = []
        for name in names:
            os.replace(staging / name, target_dir / name)
            written.append(target_dir / name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and check that a file can be written in it (a probe file, removed at once), so a
    command fails before its work rather than after it. Raises ValueError of one line naming the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; expected a folder (or a new name)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise ValueError(f"cannot write into {folder}: {err.strerror or err}") from None
    return folder


__all__ = ["check_writable_folder", "write_atomically", "write_files_atomically", "write_text_atomically"]
