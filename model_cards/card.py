"""Model card generator: a Mask2Anomaly model folder's ``README.md`` with Hub metadata and evaluated results.

`write_model_card(model_dir, results=[...])` reads the folder's ``config.json`` (architecture, post-processing),
``preprocessor_config.json``, the safetensors headers (parameter count) and, when present, the training script's
``training_config.yaml``, and fills ``template.md`` (Jinja2, through `huggingface_hub.ModelCard.from_template`).
The YAML header is built by `huggingface_hub.ModelCardData` from `EvalResult` objects, so the ``model-index`` is
written by the Hub library itself and parses back with `huggingface_hub.repocard_data.model_index_to_eval_results`.

Results are the JSON records `mask2anomaly-eval` writes (metrics as fractions in [0, 1]); the card shows them in %.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import logging

from modeling_mask2anomaly.atomic_io import write_text_atomically

logger = logging.get_logger(__name__)

TEMPLATE_PATH = Path(__file__).with_name("template.md")
CARD_NAME = "README.md"
TRAINING_CONFIG_NAME = "training_config.yaml"  # written by mask2anomaly-train next to the model
DEFAULT_LICENSE = "apache-2.0"
DEFAULT_TAGS: tuple[str, ...] = (
    "anomaly-segmentation", "road-scene", "mask2former", "mask2anomaly", "semantic-segmentation",
    "out-of-distribution-detection", "custom_code",
)
TASK_TYPE = "image-segmentation"
TASK_NAME = "Road-scene anomaly segmentation"
# (key in the results' "metrics", model-index metric type, display name). Pixel metrics first, always present.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("auprc", "auprc", "AuPRC"),
    ("fpr95", "fpr95", "FPR@95%TPR"),
    ("auroc", "roc_auc", "AUROC"),
    ("siou", "siou", "sIoU"),
    ("ppv", "ppv", "PPV"),
    ("mean_f1", "mean_f1", "mean F1"),
)
REQUIRED_METRICS: tuple[str, ...] = ("auprc", "fpr95")


# ------------------------------------------------------------------------------------------------ results


def load_results(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """One evaluation record (a `mask2anomaly-eval` JSON file or the dict it holds), checked.

    Raises ``ValueError`` naming the file (or "results") and the missing or bad field.
    """
    where = "results"
    if not isinstance(source, Mapping):
        where = os.fspath(source)
        try:
            with open(where, encoding="utf-8") as handle:
                source = json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read evaluation results {where!r}: {err}") from err
        if not isinstance(source, Mapping):
            raise ValueError(f"{where!r} holds a JSON {type(source).__name__}; expected an object written by "
                             "mask2anomaly-eval")
    record = dict(source)
    if not isinstance(record.get("benchmark"), str) or not record["benchmark"]:
        raise ValueError(f"{where}: no 'benchmark' name; expected the record mask2anomaly-eval writes")
    metrics = record.get("metrics")
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{where}: no 'metrics' object; expected {{'auprc': ..., 'fpr95': ..., ...}} as fractions")
    for key in REQUIRED_METRICS:
        if key not in metrics:
            raise ValueError(f"{where}: metrics lack {key!r}; expected at least {', '.join(REQUIRED_METRICS)}")
    for key, _, _ in METRICS:
        value = metrics.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or (math.isfinite(value) and not 0.0 <= value <= 1.0):
            raise ValueError(f"{where}: metrics[{key!r}] = {value!r}; expected a fraction in [0, 1] (or NaN)")
    return record


def _percent(value: Any) -> float | None:
    """A fraction as a percentage rounded to 2 decimals; None for missing or undefined (NaN) values."""
    if value is None or not math.isfinite(float(value)):
        return None
    return round(100.0 * float(value), 2)


def eval_results(records: Sequence[Mapping[str, Any]]) -> list[EvalResult]:
    """The model-index entries of evaluation records: one `EvalResult` per benchmark and available metric, in %."""
    entries = []
    for record in records:
        mode = record.get("mode", "exact")
        for key, metric_type, metric_name in METRICS:
            value = _percent(record["metrics"].get(key))
            if value is None:
                continue
            entries.append(EvalResult(
                task_type=TASK_TYPE,
                task_name=TASK_NAME,
                dataset_type=record["benchmark"],
                dataset_name=record.get("benchmark_name") or record["benchmark"],
                dataset_split=record.get("split"),
                metric_type=metric_type,
                metric_name=f"{metric_name} (%)",
                metric_value=value,
                metric_config=mode,
            ))
    return entries


def _result_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        options = record.get("options", {})
        row = {
            "name": (record.get("benchmark_name") or record["benchmark"])
                    + (f" ({record['split']})" if record.get("split") else ""),
            # a run cut short by --limit says so: "10 of 50 (--limit)"
            "num_images": (f"{record.get('num_images', '?')} of {record['num_available']} (--limit)"
                           if record.get("limited") else record.get("num_images", "?")),
            "mode": record.get("mode", "exact"),
            "flip_tta": "yes" if options.get("flip_tta") else "no",
            "refine": "yes" if options.get("refine") else "no",
            "scorer": options.get("scorer") or "mask2anomaly",
            "synthetic": record["benchmark"].startswith("synthroad"),
        }
        for key, _, _ in METRICS:
            value = _percent(record["metrics"].get(key))
            row[key] = "–" if value is None else f"{value:.2f}"
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ model facts


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}; expected a model folder written by save_pretrained") from err


def count_parameters(model_dir: str | os.PathLike) -> int | None:
    """Number of parameters stored in the folder's safetensors files (headers only; None when there are none)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def _human(count: int | None) -> str:
    if count is None:
        return "unknown (no safetensors weights)"
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count:,}"


def model_facts(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Architecture and post-processing settings of a model folder, for the card's tables."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    backbone = config.get("backbone_config") or {}
    if backbone.get("model_type") == "resnet":
        depth = sum(backbone.get("depths", [])) * 3 + 2
        backbone_text = f"ResNet-{depth}" if depth in (50, 101, 152) else f"ResNet (depths {backbone.get('depths')})"
    elif backbone:
        backbone_text = f"{backbone.get('model_type', 'unknown')} ({backbone.get('embed_dim', '')})".replace(" ()", "")
    else:
        backbone_text = str(config.get("backbone", "unknown"))
    labels = config.get("id2label") or {}
    names = [labels[k] for k in sorted(labels, key=int)] if labels else []
    processor = {}
    if (model_dir / "preprocessor_config.json").exists():
        processor = _read_json(model_dir / "preprocessor_config.json")
    size = processor.get("size") or {}
    if processor.get("do_resize", True) and size:
        resize = f"shortest side {size.get('shortest_edge')} (longest at most {size.get('longest_edge')})"
    else:
        resize = "native size"
    return {
        "backbone": backbone_text,
        "parameters": _human(count_parameters(model_dir)),
        "num_queries": config.get("num_queries"),
        # detectron2's DEC_LAYERS counts the query head: `decoder_layers=10` means 9 attention layers
        "decoder_layers": (config.get("decoder_layers") or 1) - 1,
        "num_labels": len(names) or config.get("num_labels"),
        "classes": ", ".join(names) if len(names) <= 25 else f"{', '.join(names[:25])}, ...",
        "global_masked_attention": config.get("global_masked_attention", True),
        "contrastive_loss": config.get("contrastive_loss", "margin"),
        "anomaly_scorer": processor.get("anomaly_scorer", config.get("anomaly_scorer", "mask2anomaly")),
        "refine": processor.get("refine", config.get("refine", True)),
        "flip_tta": processor.get("flip_tta", config.get("flip_tta", True)),
        # the processor owns the threshold (config.json's is a legacy copy); its default is the scorer's
        "anomaly_threshold": processor.get("anomaly_threshold", config.get("anomaly_threshold", 0.5)),
        "preprocessing": f"RGB, ImageNet mean/std, {resize}, padded to a multiple of "
                         f"{processor.get('size_divisor', 32)}",
    }


# ------------------------------------------------------------------------------------------------ training


OFFICIAL_RECIPE = (
    "The released models follow the official recipe: stage 1, Mask2Former losses on Cityscapes (AdamW, lr 1e-4, "
    "weight decay 0.05, poly schedule, batch 16, 90k iterations, crop 380x760, backbone frozen, Barlow Twins "
    "ResNet-50); stage 2, the same losses plus the mask contrastive loss on outlier exposure (COCO objects that "
    "are none of the Cityscapes classes, pasted with probability 0.2 and labelled 254), lr 1e-5, batch 8, "
    "5000 iterations."
)


def _scalar(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def _data_text(spec: Any) -> str:
    """A data source of the training config in words, e.g. "2000 SynthRoad scenes (split train, seed 0)"."""
    if not isinstance(spec, Mapping):
        return _scalar(spec)
    source = str(spec.get("source", "?"))
    name = {"synthroad": "SynthRoad scenes", "cityscapes": "Cityscapes images", "coco": "COCO objects"}.get(
        source, f"{source} images")
    details = ", ".join(f"{key} {_scalar(spec[key])}" for key in ("split", "root", "seed") if spec.get(key) is not None)
    count = f"{spec['num']} " if spec.get("num") is not None else ""
    return f"{count}{name}" + (f" ({details})" if details else "")


def training_summary(training_config: Mapping[str, Any]) -> str:
    """One paragraph saying how the recorded run trained, from its own record (stage, steps actually run, batch,
    learning rate, data); never the official recipe, which a run with other data or steps does not follow."""
    stage = training_config.get("stage")
    config = training_config.get("config") or {}
    settings = config.get(f"stage{stage}") if stage is not None else None
    settings = settings if isinstance(settings, Mapping) else {}
    data = config.get("data") or {}
    steps = training_config.get("max_steps", settings.get("max_steps"))
    parts = [f"Stage {stage} ({'outlier exposure' if stage == 2 else 'closed set'}):" if stage else "A run:"]
    if steps is not None:
        batch = settings.get("batch_size")
        parts.append(f"{steps} optimizer steps" + (f" of {batch} images" if batch else ""))
    if "train" in data:
        parts.append(f"on {_data_text(data['train'])}")
    sentence = " ".join(parts)
    extras = []
    if settings.get("learning_rate") is not None:
        extras.append(f"AdamW lr {_scalar(settings['learning_rate'])}")
    if settings.get("freeze_backbone"):
        extras.append("backbone frozen")
    if settings.get("outlier_exposure") and "outliers" in data:
        probability = data.get("outlier_probability")
        extras.append(f"outliers pasted from {_data_text(data['outliers'])}"
                      + (f" with probability {_scalar(probability)}" if probability is not None else ""))
    if training_config.get("init_from"):
        extras.append(f"initialised from `{training_config['init_from']}`")
    return sentence + (", " + ", ".join(extras) if extras else "") + "."


def training_section(training_config: Mapping[str, Any] | None) -> str:
    """Markdown of the training run recorded by `mask2anomaly-train` (``training_config.yaml``): the command, a
    summary and the settings of the run itself; the official recipe only for a folder without a record (a
    converted official checkpoint)."""
    if not training_config:
        return ("This folder does not record how it was trained (no `training_config.yaml`). " + OFFICIAL_RECIPE)
    lines = []
    if training_config.get("command"):
        lines += ["```bash", _scalar(training_config["command"]), "```", ""]
    lines += [training_summary(training_config), ""]
    stage = training_config.get("stage")
    config = training_config.get("config") or {}
    settings = config.get(f"stage{stage}") if stage is not None else None
    # the steps the run made (the record's max_steps, which --max-steps may have set), not the config's default
    facts = [("stage", stage), ("max_steps", training_config.get("max_steps")),
             ("initialised from", training_config.get("init_from")),
             ("processes", training_config.get("num_processes"))]
    data = config.get("data") or {}
    for key in ("train", "outliers"):
        if key in data:
            facts.append((f"{key} data", data[key]))
    for key in ("outlier_probability", "crop_size", "scale_range"):
        if key in data:
            facts.append((key.replace("_", " "), data[key]))
    if isinstance(settings, Mapping):
        facts += [(name, value) for name, value in settings.items()
                  if name != "max_steps" or training_config.get("max_steps") is None]
    lines += ["| setting | value |", "|---|---|"]
    lines += [f"| {name} | `{_scalar(value)}` |" for name, value in facts if value is not None]
    lines += ["", "The full resolved configuration is in `training_config.yaml`."]
    return "\n".join(lines)


def _load_training_config(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / TRAINING_CONFIG_NAME
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle) or None
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read {path}: {err}; expected the YAML written by mask2anomaly-train") from err


# ------------------------------------------------------------------------------------------------ the card


def render_model_card(
    model_dir: str | os.PathLike,
    results: Sequence[str | os.PathLike | Mapping[str, Any]] = (),
    *,
    repo_id: str | None = None,
    base_model: str | list[str] | None = None,
    datasets: Sequence[str] = (),
    license: str = DEFAULT_LICENSE,
    tags: Sequence[str] = (),
    widget: Sequence[Mapping[str, str]] = (),
    training_config: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    summary: str | None = None,
) -> ModelCard:
    """The model card of ``model_dir`` as a `huggingface_hub.ModelCard`; arguments as in `write_model_card`."""
    model_dir = Path(model_dir)
    records = [load_results(source) for source in results]
    facts = model_facts(model_dir)
    repo_id = repo_id or model_dir.resolve().name
    model_name = model_name or repo_id.split("/")[-1]
    if training_config is None:
        training_config = _load_training_config(model_dir)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license=license,
        datasets=list(datasets) or None,
        base_model=base_model,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
        metrics=[metric_type for _, metric_type, _ in METRICS[:3]],
        model_name=model_name if records else None,
        eval_results=eval_results(records) or None,
        widget=[dict(entry) for entry in widget] or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=f"Mask2Anomaly: {model_name}",
        summary=summary or f"`{repo_id}` is a Mask2Anomaly road-scene anomaly segmentation model for 🤗 "
                           "transformers.",
        repo_id=repo_id,
        model=facts,
        results=_result_rows(records),
        training=training_section(training_config),
    )


def write_model_card(
    model_dir: str | os.PathLike,
    results: Sequence[str | os.PathLike | Mapping[str, Any]] = (),
    base_model: str | list[str] | None = None,
    datasets: Sequence[str] = (),
    **card_options: Any,
) -> Path:
    """Write ``model_dir/README.md``: Hub metadata, model summary, results, usage, training, limitations, citation.

    Args:
        model_dir: a `save_pretrained` Mask2Anomaly folder (``config.json``, weights, processor).
        results: `mask2anomaly-eval` JSON files or their dicts; each becomes a row of the results table and
            ``model-index`` entries (AuPRC, FPR95, AUROC and, when evaluated, sIoU, PPV, mean F1, in %).
        base_model: Hub id(s) of the model this one was fine-tuned from.
        datasets: Hub dataset ids for the ``datasets`` metadata (training data).
        card_options: the keyword arguments of `render_model_card`: ``repo_id`` (used in the usage snippets;
            default: the folder's name), ``license``, ``tags`` (added to `DEFAULT_TAGS`), ``widget``
            (``[{"src": URL, "example_title": ...}]``), ``training_config`` (default: the folder's
            ``training_config.yaml`` if any), ``model_name`` (the model-index name), ``summary``.

    Returns:
        The path of the written card (written to a temporary file and renamed into place).
    """
    card = render_model_card(model_dir, results, base_model=base_model, datasets=datasets, **card_options)
    path = Path(model_dir) / CARD_NAME
    write_text_atomically(path, str(card))
    logger.info(f"wrote the model card {path} ({len(card.data.eval_results or [])} model-index entries)")
    return path


__all__ = [
    "CARD_NAME",
    "DEFAULT_TAGS",
    "METRICS",
    "count_parameters",
    "eval_results",
    "load_results",
    "model_facts",
    "render_model_card",
    "training_section",
    "training_summary",
    "write_model_card",
]
