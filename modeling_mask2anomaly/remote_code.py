"""The remote code that travels with a model folder, and the command that keeps a folder's copy equal to this package.

A saved Mask2Anomaly folder carries the Python files that `trust_remote_code=True` loads where this package is not
installed. Their one source is this package: `save_pretrained` copies them through transformers'
`custom_object_save` (every travelling class is registered with `register_for_auto_class`), and this module
finds the same set the same way, from the modules a folder's `config.json` / `preprocessor_config.json` name
(`auto_map`, `custom_pipelines`) and the package's own routes, plus everything they import relatively
(transformers' `get_relative_import_files`). A new remote-code module is picked up as soon as one of them imports it.

    python -m modeling_mask2anomaly.remote_code sync demo_model     # rewrite the folder's .py files from the package
    python -m modeling_mask2anomaly.remote_code check demo_model    # exit 1, naming each stale or missing file

Only `.py` files are written; weights and configs are never touched. This module itself does not travel.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

from .modeling_mask2anomaly import REMOTE_CODE_AUTO_MAP, REMOTE_CODE_CUSTOM_PIPELINES

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_FILES: tuple[str, ...] = ("config.json", "preprocessor_config.json")
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*")


class RemoteCodeError(ValueError):
    """A folder's configs name remote code this package cannot provide; the message names the file and value."""


def _module_of(reference: str, source: Path) -> str:
    # auto_map values are "module.Class" or, for code in another Hub repository, "org/repo--module.Class"
    module = reference.split("--")[-1].rsplit(".", 1)[0]
    if not _MODULE_NAME.fullmatch(module):
        raise RemoteCodeError(f"{source} names remote code {reference!r}; expected 'module.Class' with a module "
                              "of this package")
    return module


def modules_named_by(folder: str | os.PathLike) -> set[str]:
    """Modules the folder's `config.json` / `preprocessor_config.json` name in `auto_map` and `custom_pipelines`."""
    modules: set[str] = set()
    for name in CONFIG_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RemoteCodeError(f"{path} is not readable JSON: {error}") from None
        if not isinstance(config, dict):
            raise RemoteCodeError(f"{path} holds a {type(config).__name__}; expected a JSON object")
        auto_map, pipelines = config.get("auto_map") or {}, config.get("custom_pipelines") or {}
        if not isinstance(auto_map, dict) or not isinstance(pipelines, dict):
            raise RemoteCodeError(f"{path}: auto_map and custom_pipelines must be JSON objects")
        for reference in auto_map.values():
            for entry in reference if isinstance(reference, list) else [reference]:
                if entry is not None:
                    modules.add(_module_of(str(entry), path))
        for task, pipeline in pipelines.items():
            if not isinstance(pipeline, dict) or not isinstance(pipeline.get("impl"), str):
                raise RemoteCodeError(f"{path}: custom_pipelines[{task!r}] has no 'impl' string")
            modules.add(_module_of(pipeline["impl"], path))
    return modules


def package_modules() -> set[str]:
    """Modules the package's own routes name (what `save_pretrained` writes into `auto_map`/`custom_pipelines`)."""
    references = [*REMOTE_CODE_AUTO_MAP.values(), *(p["impl"] for p in REMOTE_CODE_CUSTOM_PIPELINES.values())]
    return {reference.rsplit(".", 1)[0] for reference in references}


def remote_code_files(modules: Iterable[str]) -> list[Path]:
    """The package files of `modules` and of everything they import relatively, recursively, sorted by name."""
    files: dict[str, Path] = {}
    for module in sorted(set(modules)):
        path = PACKAGE_DIR / f"{module}.py"
        if not path.is_file():
            raise RemoteCodeError(f"remote-code module {module!r} is not a module of this package ({PACKAGE_DIR})")
        for needed in [str(path), *get_relative_import_files(path)]:
            files[Path(needed).name] = Path(needed)
    return [files[name] for name in sorted(files)]


def travelling_files(folder: str | os.PathLike | None = None) -> list[Path]:
    """The package's remote-code files for `folder` (what its configs name, plus the package's own routes)."""
    modules = package_modules() | (modules_named_by(folder) if folder is not None else set())
    return remote_code_files(modules)


def copy_remote_code(folder: str | os.PathLike, destination: str | os.PathLike | None = None) -> list[str]:
    """Copy the package's remote code for `folder` (its configs decide which) into `destination` (default: the
    folder itself); returns the file names written."""
    destination = Path(folder if destination is None else destination)
    names = []
    for source in travelling_files(folder):
        shutil.copyfile(source, destination / source.name)
        names.append(source.name)
    return names


def stale_remote_code(folder: str | os.PathLike) -> list[str]:
    """One line per travelling file that `folder` lacks or holds with other bytes than the package; [] if none."""
    problems = []
    for source in travelling_files(folder):
        copy = Path(folder) / source.name
        if not copy.is_file():
            problems.append(f"{copy} is missing (the package has {source})")
        elif copy.read_bytes() != source.read_bytes():
            problems.append(f"{copy} differs from {source}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m modeling_mask2anomaly.remote_code {sync,check} FOLDER...`; 0 when every folder is (now) in sync."""
    parser = argparse.ArgumentParser(
        prog="python -m modeling_mask2anomaly.remote_code",
        description="Regenerate (sync) or verify (check) the remote-code .py files of model folders from this "
                    "package; weights and configs are not touched.")
    parser.add_argument("command", choices=["sync", "check"])
    parser.add_argument("folders", nargs="+", type=Path, help="model folders (with config.json)")
    args = parser.parse_args(argv)
    status = 0
    for folder in args.folders:
        try:
            if not (folder / "config.json").is_file():
                raise RemoteCodeError(f"{folder} has no config.json; expected a model folder")
            if args.command == "sync":
                print(f"{folder}: wrote {', '.join(copy_remote_code(folder))}")
                continue
            problems = stale_remote_code(folder)
        except (RemoteCodeError, OSError) as error:
            print(f"remote_code: error: {error}", file=sys.stderr)
            status = 1
            continue
        for problem in problems:
            print(f"remote_code: {problem}", file=sys.stderr)
        if problems:
            status = 1
        else:
            print(f"{folder}: remote code matches the package")
    return status


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "PACKAGE_DIR",
    "RemoteCodeError",
    "copy_remote_code",
    "main",
    "modules_named_by",
    "package_modules",
    "remote_code_files",
    "stale_remote_code",
    "travelling_files",
]
