"""The benchmark runner end to end on a tiny SynthRoad anomaly split: metrics against scikit-learn on the pooled maps
of `predict_anomaly`, components at sklearn's best-F1 threshold, bad items skipped with a non-zero exit, and a
2-process accelerate run equal to the 1-process one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shared_paths import LAUNCHES_ACCELERATE
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve
from tiny_models import synthroad_eval_setup

from mask2anomaly_eval.loop import evaluate
from mask2anomaly_eval.metrics import ComponentMetricAccumulator
from mask2anomaly_eval.run import main
from modeling_mask2anomaly import predict_anomaly

NUM_IMAGES = 3
SEED = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    data, model, processor, images, labels = synthroad_eval_setup(root, NUM_IMAGES, SEED)
    return root, data, model, processor, images, labels


def _reference(model, processor, images, labels, flip_tta: bool, batch_size: int = 1) -> dict:
    """Metrics computed here, independently of the runner: sklearn on the pooled maps of predict_anomaly."""
    maps = [p.anomaly_map for p in predict_anomaly(model, processor, [np.array(Image.open(p)) for p in images],
                                                    flip_tta=flip_tta, batch_size=batch_size)]
    valid = [label != 255 for label in labels]
    y = np.concatenate([(label[v] == 1) for label, v in zip(labels, valid)])
    s = np.concatenate([m[v] for m, v in zip(maps, valid)])
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    precision, recall, thresholds = precision_recall_curve(y, s)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    return {
        "auprc": average_precision_score(y, s),
        "auroc": roc_auc_score(y, s),
        "fpr95": fpr[np.argmax(tpr >= 0.95)],  # Fishyscapes: first operating point with TPR >= 95%
        "best_f1_threshold": thresholds[np.argmax(f1[:-1])],
        "maps": maps,
    }


def _run(args: list[str]) -> tuple[int, dict]:
    code = main(args)
    output = Path(args[args.index("--output-dir") + 1])
    benchmark = args[args.index("--benchmark") + 1]
    # results are named by benchmark and split (the SynthRoad folder's metadata says "anomaly"); a copied folder
    # without the metadata has no split
    (path,) = [p for p in (output / f"{benchmark}-anomaly.json", output / f"{benchmark}.json") if p.exists()]
    return code, json.loads(path.read_text())


@pytest.fixture(scope="module")
def one_process(setup):
    root, data, *_ = setup
    out = root / "out1"
    code, record = _run(["--model", str(root / "model"), "--benchmark", "synthroad", "--data-dir", str(data),
                         "--output-dir", str(out), "--components", "--batch-size", "1", "--bootstrap", "20"])
    return code, record, out


def test_runner_matches_sklearn_on_pooled_pixels(setup, one_process):
    root, data, model, processor, images, labels = setup
    code, record, out = one_process
    assert code == 0 and record["failures"] == []
    assert record["num_images"] == NUM_IMAGES and record["benchmark"] == "synthroad"
    assert record["model"] == str(root / "model")
    assert record["options"]["flip_tta"] is True and record["options"]["refine"] is True
    assert record["timing"]["total_seconds"] > 0
    reference = _reference(model, processor, images, labels, flip_tta=True)
    for key in ("auprc", "auroc", "fpr95"):
        assert record["metrics"][key] == pytest.approx(reference[key], abs=1e-9), key
    # components: the colleague-tested accumulator fed the same maps at sklearn's best-F1 threshold
    assert record["component"]["component_threshold"] == pytest.approx(reference["best_f1_threshold"], abs=1e-7)
    component = ComponentMetricAccumulator("anomaly", reference["best_f1_threshold"])
    for anomaly_map, label in zip(reference["maps"], labels):
        component.add(anomaly_map, label)
    expected = component.compute()
    assert record["component"]["track"] == "anomaly"
    for key in ("siou", "ppv", "mean_f1"):
        want = expected[key]
        assert (record["metrics"][key] is None) if np.isnan(want) else record["metrics"][key] == pytest.approx(want)
    markdown = (out / "synthroad-anomaly.md").read_text()
    assert "AuPRC" in markdown and f"{100 * record['metrics']['auprc']:.2f}" in markdown


def test_runner_skips_bad_items_and_exits_non_zero(setup, tmp_path):
    root, data, model, processor, images, labels = setup
    bad = tmp_path / "data"
    for sub in ("images", "labels"):
        (bad / sub).mkdir(parents=True)
        for path in (data / sub).glob("*.png"):
            (bad / sub / path.name).write_bytes(path.read_bytes())
    (bad / "images" / "synthroad_anomaly_000090.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    Image.fromarray(np.zeros((64, 128), np.uint8)).save(bad / "labels" / "synthroad_anomaly_000090.png")
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(bad / "images" / "synthroad_anomaly_000091.png")
    Image.fromarray(np.zeros((32, 128), np.uint8)).save(bad / "labels" / "synthroad_anomaly_000091.png")
    code, record = _run(["--model", str(root / "model"), "--benchmark", "synthroad", "--data-dir", str(bad),
                         "--output-dir", str(tmp_path / "out"), "--no-flip", "--batch-size", "2"])
    assert code == 1
    assert record["num_images"] == NUM_IMAGES and record["num_items"] == NUM_IMAGES + 2
    errors = " ".join(f["error"] for f in record["failures"])
    assert len(record["failures"]) == 2
    assert "synthroad_anomaly_000090.png" in errors and "32x128" in errors and "64x128" in errors
    assert record["options"]["flip_tta"] is False
    reference = _reference(model, processor, images, labels, flip_tta=False, batch_size=2)  # as the run batches
    assert record["metrics"]["auprc"] == pytest.approx(reference["auprc"], abs=1e-6)
    assert "failed" in (tmp_path / "out" / "synthroad.md").read_text()


@LAUNCHES_ACCELERATE
def test_two_processes_equal_one(setup, one_process, tmp_path):
    root, data, *_ = setup
    _, single, _ = one_process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out2"
    result = subprocess.run(
        # --multi_gpu: on a machine without accelerator this is a 2-process CPU (gloo) group; `--cpu` would start
        # a single process
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mask2anomaly_eval.run",
         "--model", str(root / "model"), "--benchmark", "synthroad", "--data-dir", str(data),
         "--output-dir", str(out), "--components", "--batch-size", "1", "--bootstrap", "20"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    double = json.loads((out / "synthroad-anomaly.json").read_text())
    assert double["options"]["num_processes"] == 2 and single["options"]["num_processes"] == 1
    assert double["num_images"] == single["num_images"] == NUM_IMAGES
    assert double["metrics"] == pytest.approx(single["metrics"], abs=1e-12)
    assert double["pixel"]["num_pos"] == single["pixel"]["num_pos"]
    # per-image rows and bootstrap intervals do not depend on the sharding either (rows merged in image order)
    assert [row["name"] for row in double["per_image"]] == [row["name"] for row in single["per_image"]]
    for key, interval in single["bootstrap"]["intervals"].items():
        assert double["bootstrap"]["intervals"][key] == pytest.approx(interval, abs=1e-12, nan_ok=True), key


def test_evaluate_model_api_on_in_memory_items(setup):
    """The Python API on dataset-like rows (what training's periodic validation passes): same numbers."""
    _, _, model, processor, images, labels = setup
    rows = [{"image": Image.open(p), "label": Image.fromarray(label)} for p, label in zip(images, labels)]
    result = evaluate(model, processor, rows, flip_tta=False, batch_size=2, limit=2, progress=False)
    # same batches as the runner's, so the maps are bit-identical (CPU kernels differ slightly between batch sizes)
    reference = _reference(model, processor, images[:2], labels[:2], flip_tta=False, batch_size=2)
    assert result["num_images"] == 2 and result["options"]["limit"] == 2
    for key in ("auprc", "auroc", "fpr95"):
        assert result["metrics"][key] == pytest.approx(reference[key], abs=1e-9), key
    with pytest.raises(ValueError, match="mode='bins'"):
        evaluate(model, processor, rows, mode="bins")
