"""`mask2anomaly-publish`: assemble a model folder into a complete Hub repository, check it, and upload it.

    mask2anomaly-publish runs/stage2 --repo-id org/mask2anomaly-r50 --results results/*.json
    mask2anomaly-publish runs/stage2 --repo-id org/mask2anomaly-r50 --dry-run --output-dir outputs/hub

The Hub folder holds: the weights the model loads and nothing else (``model.safetensors``, or
``model.safetensors.index.json`` and the shards it names; other ``*.safetensors`` such as an optimizer state stay
behind; a folder with ``.bin``/``.pt``/pickle files is refused, since loading them can run arbitrary code, and so is
any file that is a link leading out of the model folder), ``config.json`` and ``preprocessor_config.json`` (with
``auto_map``), the remote-code files every ``auto_map``/``custom_pipelines`` entry names and the files they import
(always this package's copies, never the model folder's: see `modeling_mask2anomaly.remote_code`), ``handler.py`` and
``requirements.txt`` for Inference Endpoints, the training record when there is one, widget example images under
``examples/``, and the model card (``README.md``, see `mask2anomaly_model_cards.card`).

Before anything is uploaded, the folder is loaded in a fresh Python process in which this project cannot be
imported (everything must come from the folder's remote code, ``HF_HUB_OFFLINE=1``): config, model and image
processor through the Auto classes with ``trust_remote_code=True``, one forward pass and anomaly map on a widget
image and, when the folder routes ``image-segmentation`` to its own pipeline, one call of ``handler.py``.
Then ``HfApi().create_repo`` + ``upload_folder``; ``--dry-run`` writes the folder to ``--output-dir`` and stops.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from transformers.utils import logging

from .card import TRAINING_CONFIG_NAME, load_results, write_model_card
from .cli import build_parser, main  # noqa: F401  (main: the entry point)

logger = logging.get_logger(__name__)

HANDLER_NAME = "handler.py"

# Files whose loading unpickles: never published (safetensors is the only weight format that goes up).
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
# Besides the weights and remote code, what a model folder may carry to the Hub.
EXTRA_FILES: tuple[str, ...] = ("preprocessor_config.json", TRAINING_CONFIG_NAME, "eval_results.json")
# The installed model package (found without importing it, so that --help stays light); remote code and the
# handler are always copied from here.
PACKAGE_DIR = Path(importlib.util.find_spec("modeling_mask2anomaly").origin).parent
EXAMPLES_DIR = "examples"
# What an Inference Endpoint must install on top of its torch image to run the remote code and the handler.
ENDPOINT_PACKAGES: tuple[str, ...] = ("transformers", "scipy", "pillow", "numpy", "safetensors")


class PublishError(ValueError):
    """The model folder cannot be published as it is; the message says which file and why."""


# ------------------------------------------------------------------------------------------------ checks


WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def _inside(model_dir: Path, name: str) -> Path:
    """``model_dir / name`` once it is known to be a file of the folder itself: a link that leads out of it (to a
    file anywhere else on this machine) is refused, naming both."""
    path = model_dir / name
    target = path.resolve()
    if not target.is_relative_to(model_dir.resolve()):
        raise PublishError(f"{path} is a link to {target}, outside the model folder; only the folder's own files are "
                           "published (copy the file in if it belongs to the model)")
    return path


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files the model loads: ``model.safetensors``, or the index and the shards its ``weight_map``
    names. Any other ``*.safetensors`` (an optimizer state, an EMA copy) is not the model's and is not published."""
    index = model_dir / WEIGHTS_INDEX_NAME
    if not index.is_file():
        if not (model_dir / WEIGHTS_NAME).is_file():
            raise PublishError(f"{model_dir} has no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME} and its shards); expected "
                               "a folder written by save_pretrained")
        return [_inside(model_dir, WEIGHTS_NAME)]
    try:
        weight_map = json.loads(_inside(model_dir, WEIGHTS_INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise PublishError(f"{index} is not a safetensors index (a JSON object with a 'weight_map' of tensor -> shard "
                           f"file): {error!r}") from None
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise PublishError(f"{index} names the shard {shard!r}; expected a .safetensors file name in the folder")
        if not (model_dir / shard).is_file():
            raise PublishError(f"{index} names the shard {shard}, which {model_dir} does not have")
    return [_inside(model_dir, WEIGHTS_INDEX_NAME)] + [_inside(model_dir, shard) for shard in shards]


def check_model_dir(model_dir: Path) -> list[Path]:
    """Check that ``model_dir`` is a publishable Mask2Anomaly folder; return the weight files to publish."""
    if not (model_dir / "config.json").is_file():
        raise PublishError(f"{model_dir} has no config.json; expected a folder written by save_pretrained")
    try:
        config = json.loads(_inside(model_dir, "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PublishError(f"{model_dir / 'config.json'} is not valid JSON ({error}); expected a save_pretrained "
                           "config") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "mask2anomaly":
        raise PublishError(f"{model_dir / 'config.json'} has model_type {model_type!r}; expected 'mask2anomaly'")
    pickles = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise PublishError(f"{model_dir} holds pickle-based file(s) {pickles}: loading them can run arbitrary code, "
                           "so they are never published; re-save the model with safetensors "
                           "(save_pretrained(..., safe_serialization=True)) and remove them")
    weights = weight_files(model_dir)
    unused = sorted(p.name for p in model_dir.glob("*.safetensors") if p.name not in {w.name for w in weights})
    if unused:
        logger.warning(f"{model_dir}: not publishing {', '.join(unused)} (not among the model's weight files)")
    return weights


def endpoint_requirements() -> str:
    """``requirements.txt`` for Inference Endpoints, with this project's own version ranges for those packages."""
    try:
        requires = importlib.metadata.requires("mask2anomaly") or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    pinned = {}
    for requirement in requires:
        if ";" in requirement:  # extras (test, demo) are not needed to serve
            continue
        name = re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower()
        pinned[name] = requirement
    lines = [pinned.get(package, package) for package in ENDPOINT_PACKAGES]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ assembling


def default_widget_images(folder: Path, count: int = 2) -> list[Path]:
    """Write ``count`` SynthRoad anomaly scenes as widget examples (used when none are given)."""
    from PIL import Image

    from mask2anomaly_training.synthroad import iter_items

    paths = []
    for stem, image, _ in iter_items("anomaly", count, seed=0, height=256, width=512):
        path = folder / f"{stem}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def _widget_entries(names: Sequence[str], repo_id: str) -> list[dict[str, str]]:
    # The widget needs absolute URLs; files in the repository resolve under /resolve/main/.
    return [{"src": f"https://huggingface.co/{repo_id}/resolve/main/{EXAMPLES_DIR}/{name}",
             "example_title": Path(name).stem.replace("_", " ")} for name in names]


def find_handler(handler: str | os.PathLike | None = None) -> Path:
    """The Inference Endpoints handler to publish: ``handler`` or the package's ``handler.py`` (installed with
    ``modeling_mask2anomaly``, so editable and regular installs both have it)."""
    path = Path(handler) if handler else PACKAGE_DIR / HANDLER_NAME
    if not path.is_file():
        raise PublishError(f"no Inference Endpoints handler at {path}; pass --handler PATH to "
                           f"modeling_mask2anomaly/{HANDLER_NAME}")
    return path


def assemble_hub_folder(
    model_dir: str | os.PathLike,
    folder: str | os.PathLike,
    repo_id: str,
    *,
    results: Sequence[str | os.PathLike] = (),
    widget_images: Sequence[str | os.PathLike] = (),
    handler: str | os.PathLike | None = None,
    card_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """Write the complete Hub repository of ``model_dir`` into the empty folder ``folder``; return its file list."""
    model_dir, folder = Path(model_dir), Path(folder)
    weights = check_model_dir(model_dir)
    records = [load_results(path) for path in results]  # fail before copying anything
    for path in weights:
        shutil.copyfile(path, folder / path.name)
    shutil.copyfile(model_dir / "config.json", folder / "config.json")
    for name in EXTRA_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(_inside(model_dir, name), folder / name)
    if not (folder / "preprocessor_config.json").is_file():
        # AutoImageProcessor and the pipeline need it: derive it from the model's post-processing settings
        from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyImageProcessor

        logger.warning(f"{model_dir} has no preprocessor_config.json; writing the official one from its config")
        config = Mask2AnomalyConfig.from_pretrained(model_dir)
        Mask2AnomalyImageProcessor.from_model_config(config).save_pretrained(folder)
    from modeling_mask2anomaly.remote_code import RemoteCodeError, copy_remote_code

    # The remote code always comes from this package (never from the model folder, whose copies may be stale):
    # the modules the configs name and everything they import relatively.
    try:
        copy_remote_code(folder)
    except RemoteCodeError as error:
        raise PublishError(str(error)) from None
    shutil.copyfile(find_handler(handler), folder / HANDLER_NAME)
    (folder / "requirements.txt").write_text(endpoint_requirements(), encoding="utf-8")

    examples = folder / EXAMPLES_DIR
    examples.mkdir()
    if widget_images:
        for image in widget_images:
            if not Path(image).is_file():
                raise PublishError(f"widget image {image} does not exist; expected an image file")
            shutil.copyfile(image, examples / Path(image).name)
    else:
        default_widget_images(examples)
    names = sorted(p.name for p in examples.iterdir())
    write_model_card(folder, records, repo_id=repo_id, widget=_widget_entries(names, repo_id), **(card_kwargs or {}))
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    logger.info(f"assembled {len(files)} files for {repo_id} in {folder}")
    return files


# ------------------------------------------------------------------------------------------------ smoke test


SMOKE_TEST = textwrap.dedent(
    """
    import base64, json, sys
    # this project must not be importable: everything has to come from the folder's remote code
    for name in ("modeling_mask2anomaly", "mask2anomaly_training", "mask2anomaly_eval", "mask2anomaly_model_cards"):
        sys.modules[name] = None
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForUniversalSegmentation
    folder, image_path, check_handler = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForUniversalSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    for obj in (config, model, processor):
        assert type(obj).__module__.startswith("transformers_modules"), type(obj)
    image = Image.open(image_path).convert("RGB")
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
    anomaly = processor.post_process_anomaly_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    assert tuple(anomaly.shape) == image.size[::-1] and torch.isfinite(anomaly).all(), anomaly.shape
    report = {"model": type(model).__name__, "anomaly_map": list(anomaly.shape)}
    if check_handler:
        sys.path.insert(0, folder)
        from handler import EndpointHandler
        encoded = base64.b64encode(open(image_path, "rb").read()).decode("ascii")
        segments = EndpointHandler(folder)({"inputs": encoded})
        assert isinstance(segments, list) and all({"label", "score", "mask"} <= set(s) for s in segments), segments
        report["handler_labels"] = [s["label"] for s in segments]
    print(json.dumps(report))
    """
)


def smoke_test(folder: str | os.PathLike, timeout: float = 600) -> dict[str, Any]:
    """Load the assembled folder in a subprocess without this project importable; raise `PublishError` if it fails.

    The handler is exercised when the folder's config routes ``image-segmentation`` to its remote-code pipeline
    (without that route the stock pipeline would serve it, which cannot produce anomaly masks).
    """
    folder = Path(folder).resolve()
    image = sorted((folder / EXAMPLES_DIR).iterdir())[0]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    check_handler = "image-segmentation" in (config.get("custom_pipelines") or {})
    if not check_handler:
        logger.warning(f"{folder / 'config.json'} has no custom_pipelines['image-segmentation']: "
                       "pipeline('image-segmentation') and handler.py will not use the Mask2Anomaly pipeline; "
                       "re-save the model with a version of this package that records it")
    with tempfile.TemporaryDirectory(prefix="mask2anomaly-smoke-") as scratch:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "PYTHONPATH"}
        env.update({"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": os.path.join(scratch, "modules")})
        result = subprocess.run(
            [sys.executable, "-c", SMOKE_TEST, str(folder), str(image), "1" if check_handler else "0"],
            cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout,
        )
    if result.returncode != 0:
        raise PublishError(f"the assembled folder {folder} does not load without this package "
                           f"(trust_remote_code=True):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ publishing


def publish(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    results: Sequence[str | os.PathLike] = (),
    private: bool = False,
    dry_run: bool = False,
    output_dir: str | os.PathLike | None = None,
    widget_images: Sequence[str | os.PathLike] = (),
    handler: str | os.PathLike | None = None,
    card_kwargs: dict[str, Any] | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Assemble, check and (unless ``dry_run``) upload; returns ``{"folder", "files", "check", "url"}``.

    With ``output_dir`` the folder is kept there (it must not exist or be empty, or with ``overwrite`` be an earlier
    output, a folder with a config.json; it is assembled beside it and renamed into place, so it is never left
    half-written, and an earlier output is replaced only once the new one is complete); otherwise it lives in a
    temporary folder.
    """
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id):
        raise PublishError(f"--repo-id {repo_id!r}; expected ORG/NAME")
    if dry_run and output_dir is None:
        raise PublishError("--dry-run needs --output-dir: the folder is all a dry run produces")
    if output_dir is not None:
        output_dir = Path(output_dir)
        if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
            if not overwrite:
                raise PublishError(f"--output-dir {output_dir} exists and is not empty; expected a new or empty "
                                   "folder (--overwrite replaces an earlier output)")
            if not (output_dir / "config.json").is_file():
                raise PublishError(f"--overwrite: {output_dir} has no config.json, so it is not an earlier output of "
                                   "mask2anomaly-publish; not replacing it")
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    else:
        scratch = Path(tempfile.mkdtemp(prefix="mask2anomaly-publish-"))
    try:
        try:
            files = assemble_hub_folder(model_dir, scratch, repo_id, results=results, widget_images=widget_images,
                                        handler=handler, card_kwargs=card_kwargs)
            check = smoke_test(scratch)
            folder = scratch
            if output_dir is not None:
                if output_dir.is_dir() and any(output_dir.iterdir()):  # --overwrite: the earlier output goes now
                    old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old.", dir=output_dir.parent))
                    os.replace(output_dir, old / output_dir.name)
                    shutil.rmtree(old, ignore_errors=True)
                os.replace(scratch, output_dir)
                folder = output_dir
        except OSError as error:  # a full disk, a folder that cannot be written: nothing is kept
            where = output_dir if output_dir is not None else "the Hub folder"
            raise PublishError(f"cannot write {where}: {error.strerror or error}"
                               + (f" ({error.filename})" if error.filename else "")) from None
        url = None
        if not dry_run:
            api = HfApi(token=token)
            url = str(api.create_repo(repo_id, private=private, exist_ok=True))
            api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                              commit_message=commit_message or f"Upload Mask2Anomaly model from {Path(model_dir).name}")
        return {"folder": str(folder), "files": files, "check": check, "url": url}
    finally:
        if output_dir is None or scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    """The command once its arguments are parsed (`cli.build_parser`)."""
    card_kwargs = {"license": args.license, "base_model": args.base_model, "datasets": args.dataset}
    try:
        outcome = publish(args.model_dir, args.repo_id, results=args.results, private=args.private,
                          dry_run=args.dry_run, output_dir=args.output_dir, widget_images=args.widget_image,
                          handler=args.handler, card_kwargs=card_kwargs, commit_message=args.commit_message,
                          overwrite=args.overwrite)
    except PublishError as err:
        print(f"mask2anomaly-publish: {err}", file=sys.stderr)
        return 1
    checked = f"checked ({outcome['check']['model']}, anomaly map {outcome['check']['anomaly_map']}" + (
        ", handler" if "handler_labels" in outcome["check"] else "") + ")"
    where = f"uploaded to {outcome['url']}" if outcome["url"] else f"dry run: written to {outcome['folder']}"
    print(f"{args.repo_id}: {len(outcome['files'])} files, {checked}; {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
