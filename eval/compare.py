"""Many evaluation results side by side: one table of models x benchmarks x scorers (markdown and CSV) from the
``<benchmark>.json`` records `mask2anomaly-eval` writes, as ``mask2anomaly-eval --compare results/*/*.json``.

One row per record, sorted by benchmark, model and scorer; metric columns in % (AuPRC, FPR95, AUROC and, where a
record has them, sIoU, PPV, mean F1), with the bootstrap interval in brackets when the record has one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

METRICS: tuple[tuple[str, str], ...] = (("auprc", "AuPRC"), ("fpr95", "FPR95"), ("auroc", "AUROC"),
                                        ("siou", "sIoU"), ("ppv", "PPV"), ("mean_f1", "mean F1"))
KEY_COLUMNS: tuple[str, ...] = ("benchmark", "model", "scorer", "mode", "flip_tta", "refine", "num_images")


def load_record(path: str | os.PathLike) -> dict[str, Any]:
    """One result record; ValueError naming the file when it is not readable JSON or not a `mask2anomaly-eval`
    result (no ``metrics`` / ``benchmark`` / ``options``)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read a result record ({err})") from None
    missing = [key for key in ("metrics", "benchmark", "options", "model") if not isinstance(record, dict)
               or key not in record]
    if missing:
        raise ValueError(f"{path}: not a mask2anomaly-eval result (no {', '.join(missing)}); expected a "
                         "<benchmark>.json written by mask2anomaly-eval")
    return record


def comparison_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per record: the key columns, then per metric its value (fraction or None) and, with a
    bootstrap, ``<metric>_low`` / ``<metric>_high``; sorted by benchmark, model, scorer."""
    rows = []
    for record in records:
        options = record["options"]
        row: dict[str, Any] = {
            "benchmark": record.get("benchmark_name") or record["benchmark"],
            "model": record["model"],
            "scorer": options.get("scorer"),
            "mode": options.get("mode", record.get("mode")),
            "flip_tta": options.get("flip_tta"),
            "refine": options.get("refine"),
            "num_images": record.get("num_images"),
        }
        intervals = (record.get("bootstrap") or {}).get("intervals", {})
        for key, _ in METRICS:
            row[key] = record["metrics"].get(key)
            if key in intervals:
                row[f"{key}_low"], row[f"{key}_high"] = intervals[key]["low"], intervals[key]["high"]
        rows.append(row)
    return sorted(rows, key=lambda row: (str(row["benchmark"]), str(row["model"]), str(row["scorer"])))


def _present(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    return [(key, name) for key, name in METRICS if any(key in row and row[key] is not None for row in rows)]


def _percent(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def comparison_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a markdown table (metrics in %, ``value [low, high]`` with a bootstrap interval)."""
    metrics = _present(rows)
    header = ["benchmark", "model", "scorer", "images"] + [name for _, name in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["benchmark"]), f"`{row['model']}`", f"`{row['scorer']}`", str(row["num_images"])]
        for key, _ in metrics:
            cell = _percent(row.get(key))
            if row.get(f"{key}_low") is not None:
                cell += f" [{_percent(row[f'{key}_low'])}, {_percent(row[f'{key}_high'])}]"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV (fractions, as in the records; empty where undefined)."""
    columns = list(KEY_COLUMNS)
    for key, _ in _present(rows):
        columns.append(key)
        if any(f"{key}_low" in row for row in rows):
            columns += [f"{key}_low", f"{key}_high"]
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
    return stream.getvalue()


def compare_files(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """`comparison_rows` of the records in ``paths`` (ValueError naming the first bad file)."""
    if not paths:
        raise ValueError("no result file to compare; expected <benchmark>.json files written by mask2anomaly-eval")
    return comparison_rows([load_record(path) for path in paths])


__all__ = ["comparison_csv", "comparison_markdown", "comparison_rows", "compare_files", "load_record"]
