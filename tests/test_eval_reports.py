"""What `mask2anomaly-eval` writes besides the metrics, checked against computations made here: the per-image CSV
(scikit-learn per image), the curve PNGs and CSV (sklearn's curves), the worst/best heatmaps (sklearn's ranking),
`--bootstrap` (a naive resample-and-recompute with sklearn on the maps of `predict_anomaly`), `--anomaly-scorer
all` (each scorer equal to its own run, one forward pass per view for all of them) and `--compare`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from tiny_models import synthroad_eval_setup

from mask2anomaly_eval.bootstrap import resample_indices
from mask2anomaly_eval.compare import comparison_rows
from mask2anomaly_eval.run import main
from modeling_mask2anomaly import ANOMALY_SCORERS, Mask2AnomalyForUniversalSegmentation, predict_anomaly

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

NUM_IMAGES = 4
SEED = 5
STEM = "synthroad-anomaly"  # results files: <benchmark>-<split>
NUM_RESAMPLES = 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    data, model, processor, images, labels = synthroad_eval_setup(root, NUM_IMAGES, SEED)
    return root, data, model, processor, images, labels


def _maps(model, processor, images, scorer=None):
    arrays = [np.array(Image.open(p)) for p in images]
    return [p.anomaly_map for p in predict_anomaly(model, processor, arrays, flip_tta=False, scorer=scorer)]


def _pooled(maps, labels, rows=None):
    rows = range(len(maps)) if rows is None else rows
    y = np.concatenate([labels[i][labels[i] != 255] == 1 for i in rows])
    s = np.concatenate([maps[i][labels[i] != 255] for i in rows])
    return y, s


@pytest.fixture(scope="module")
def report(setup):
    root, data, *_ = setup
    out = root / "out"
    code = main(["--model", str(root / "model"), "--benchmark", "synthroad", "--data-dir", str(data),
                 "--output-dir", str(out), "--no-flip", "--bootstrap", str(NUM_RESAMPLES), "--seed", "7",
                 "--visualize", "1"])
    assert code == 0
    return out, json.loads((out / f"{STEM}.json").read_text())


def test_per_image_csv_matches_sklearn_per_image(setup, report):
    _, _, model, processor, images, labels = setup
    out, record = report
    maps = _maps(model, processor, images)
    with open(out / f"{STEM}_per_image.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [Path(row["name"]).name for row in rows] == [p.name for p in images]
    for row, anomaly_map, label in zip(rows, maps, labels):
        valid = label != 255
        y, s = label[valid] == 1, anomaly_map[valid]
        assert int(row["num_valid"]) == valid.sum() and int(row["num_anomaly"]) == y.sum()
        assert float(row["anomalous_area"]) == pytest.approx(y.mean(), rel=1e-5)
        assert float(row["score_max"]) == pytest.approx(s.max(), rel=1e-5)
        if y.any() and not y.all():
            assert float(row["auprc"]) == pytest.approx(average_precision_score(y, s), rel=1e-5)
            assert float(row["auroc"]) == pytest.approx(roc_auc_score(y, s), rel=1e-5)
        else:
            assert row["auprc"] == ""
    assert len(record["per_image"]) == NUM_IMAGES


def test_curves_are_pngs_of_sklearns_curve_and_listed_in_the_report(setup, report):
    _, _, model, processor, images, labels = setup
    out, record = report
    for name in (f"{STEM}_pr.png", f"{STEM}_roc.png"):
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and picture.width >= 400
    markdown = (out / f"{STEM}.md").read_text()
    for name in (f"{STEM}_pr.png", f"{STEM}_roc.png", f"{STEM}_per_image.csv", f"{STEM}_curve.csv"):
        assert name in markdown
    y, s = _pooled(_maps(model, processor, images), labels)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    points = np.loadtxt(out / f"{STEM}_curve.csv", delimiter=",", skiprows=1)
    # every kept point is an operating point of sklearn's curve (same threshold, same TPR and FPR)
    for threshold, point_tpr, point_fpr, _ in points:
        index = int(np.argmin(np.abs(thresholds - threshold)))
        assert thresholds[index] == pytest.approx(threshold, rel=1e-6)
        assert (tpr[index], fpr[index]) == pytest.approx((point_tpr, point_fpr), abs=1e-9)
    assert points[-1, 1] == pytest.approx(1.0) and points[-1, 2] == pytest.approx(1.0)


def test_visualize_writes_the_worst_and_best_by_per_image_ap(setup, report):
    _, _, model, processor, images, labels = setup
    out, _ = report
    maps = _maps(model, processor, images)
    scores = {}
    for path, anomaly_map, label in zip(images, maps, labels):
        valid = label != 255
        if (label[valid] == 1).any() and (label[valid] == 0).any():
            scores[path.stem] = average_precision_score(label[valid] == 1, anomaly_map[valid])
    ranked = sorted(scores, key=scores.get)
    written = sorted(p.name for p in (out / f"{STEM}_heatmaps").iterdir())
    assert written == sorted([f"worst-1-{ranked[0]}.png", f"best-1-{ranked[-1]}.png"])
    with Image.open(out / f"{STEM}_heatmaps" / f"worst-1-{ranked[0]}.png") as picture:
        assert picture.mode == "RGB" and picture.width > 128  # image plus colour bar


def test_cli_bootstrap_equals_naive_resampling(setup, report):
    _, _, model, processor, images, labels = setup
    _, record = report
    maps = _maps(model, processor, images)
    values = {"auprc": [], "auroc": [], "fpr95": []}
    for row in resample_indices(NUM_IMAGES, NUM_RESAMPLES, 7):
        y, s = _pooled(maps, labels, row)
        if not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        values["auprc"].append(average_precision_score(y, s))
        values["auroc"].append(roc_auc_score(y, s))
        values["fpr95"].append(fpr[np.argmax(tpr >= 0.95)])
    intervals = record["bootstrap"]["intervals"]
    # exact when the distinct scores fit the bootstrap's score levels, else within the levels' rounding
    tolerance = 1e-6 if record["bootstrap"]["exact"] else 2e-3
    for key, series in values.items():
        low, high = np.percentile(series, [2.5, 97.5])
        assert intervals[key]["low"] == pytest.approx(low, abs=tolerance), key
        assert intervals[key]["high"] == pytest.approx(high, abs=tolerance), key
        assert intervals[key]["num_defined"] == len(series)
    assert "bootstrap intervals" in (report[0] / f"{STEM}.md").read_text()


def test_all_scorers_in_one_pass_equal_separate_runs(setup, tmp_path):
    root, data, model, processor, images, labels = setup
    calls = []
    hook = Mask2AnomalyForUniversalSegmentation.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return hook(self, *args, **kwargs)

    Mask2AnomalyForUniversalSegmentation.forward = counting
    try:
        code = main(["--model", str(root / "model"), "--benchmark", "synthroad", "--data-dir", str(data),
                     "--output-dir", str(tmp_path), "--no-flip", "--anomaly-scorer", "all", "--no-curves"])
    finally:
        Mask2AnomalyForUniversalSegmentation.forward = hook
    assert code == 0
    assert len(calls) == NUM_IMAGES  # one forward per image, whatever the number of scorers
    for scorer in ANOMALY_SCORERS:
        record = json.loads((tmp_path / f"{STEM}-{scorer}.json").read_text())
        assert record["options"]["scorer"] == scorer
        y, s = _pooled(_maps(model, processor, images, scorer=scorer), labels)
        assert record["metrics"]["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-9), scorer
        assert record["metrics"]["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9), scorer
    table = (tmp_path / f"{STEM}-scorers.md").read_text()
    assert all(f"`{scorer}`" in table for scorer in ANOMALY_SCORERS)


def test_compare_tables_models_benchmarks_and_scorers(setup, report, tmp_path, capsys):
    _, _, _, _, _, _ = setup
    out, record = report
    other = dict(record, model="other_model", options=dict(record["options"], scorer="rba"),
                 metrics=dict(record["metrics"], auprc=0.5))
    other.pop("bootstrap")
    (tmp_path / "other.json").write_text(json.dumps(other))
    code = main(["--compare", str(out / f"{STEM}.json"), str(tmp_path / "other.json"),
                 "--output-dir", str(tmp_path / "cmp")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "other_model" in printed and "`rba`" in printed
    with open(tmp_path / "cmp" / "comparison.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["model"], row["scorer"]) for row in rows] == [(record["model"], "mask2anomaly"),
                                                                ("other_model", "rba")]
    assert float(rows[0]["auprc"]) == pytest.approx(record["metrics"]["auprc"])
    assert float(rows[0]["auprc_low"]) == pytest.approx(record["bootstrap"]["intervals"]["auprc"]["low"])
    assert rows[1]["auprc"] == "0.5" and rows[1]["auprc_low"] == ""
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert f"{100 * record['metrics']['auprc']:.2f} [" in markdown and "| 50.00 |" in markdown
    assert len(comparison_rows([record, other])) == 2
    (tmp_path / "bad.json").write_text("{}")
    assert main(["--compare", str(tmp_path / "bad.json"), "--output-dir", str(tmp_path / "cmp")]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_usage_errors_name_the_flag(setup, tmp_path, capsys):
    root, data, *_ = setup
    with pytest.raises(SystemExit):
        main(["--benchmark", "synthroad", "--data-dir", str(data)])
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(root / "model"), "--benchmark", "synthroad", "--data-dir", str(data),
              "--bootstrap", "-1"])
    assert "--bootstrap -1" in capsys.readouterr().err
