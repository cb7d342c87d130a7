"""Shared metric-test helpers: the SegmentMeIfYouCan reference fixture cases, random frames, and the independent
references (scikit-learn on pooled pixels; the official component-metric values)."""

from __future__ import annotations

import numpy as np
import pytest
from shared_paths import SHARED_FIXTURES
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

FIXTURES = SHARED_FIXTURES / "metrics_smiyc"
TOL = 1e-9
CASES = ["anomaly_track", "obstacle_track", "anomaly_track_float16_ties", "obstacle_track_coarse_ties",
         "constant_score"]


def load_case(name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    data = np.load(FIXTURES / f"{name}.npz")
    n = int(data["num_images"])
    return [data[f"scores_{i:03d}"] for i in range(n)], [data[f"labels_{i:03d}"] for i in range(n)]


def sklearn_reference(scores, labels) -> dict:
    """Independent values: scikit-learn on the pooled non-void pixels, FPR95 as Fishyscapes defines it."""
    s = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in scores])
    l = np.concatenate([np.asarray(x).ravel() for x in labels])
    y, s = l[l != 255] == 1, s[l != 255]
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    index = np.searchsorted(tpr, 0.95)
    # ood_metrics 1.1.2 `fpr_at_95_tpr`: default roc_curve, linear interpolation (its other branches cannot occur
    # here because the curve starts at TPR 0 and ends at TPR 1).
    fpr_dropped, tpr_dropped, _ = roc_curve(y, s)
    precision, recall, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return {
        "auprc": average_precision_score(y, s),
        "auroc": roc_auc_score(y, s),
        "fpr95": fpr[index],
        "fpr95_threshold": thresholds[index],
        "fpr95_interpolated": np.interp(0.95, tpr_dropped, fpr_dropped),
        "best_f1": f1.max(),
        "num_pos": int(y.sum()),
        "num_neg": int((~y).sum()),
        "pooled": (y, s),
    }


def assert_matches_sklearn(result: dict, ref: dict) -> None:
    for key in ("auprc", "auroc", "fpr95", "fpr95_interpolated", "best_f1"):
        assert result[key] == pytest.approx(ref[key], abs=TOL), key
    assert result["fpr95_threshold"] == ref["fpr95_threshold"]
    assert (result["num_pos"], result["num_neg"]) == (ref["num_pos"], ref["num_neg"])
    # The best-F1 threshold must give the best F1 (ties may pick a different, equally good threshold).
    y, s = ref["pooled"]
    predicted = s >= result["best_f1_threshold"]
    tp = np.sum(predicted & y)
    assert 2 * tp / (predicted.sum() + y.sum()) == pytest.approx(ref["best_f1"], abs=TOL)


def random_frames(kind: str, seed: int, num: int = 6) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    scores, labels = [], []
    for i in range(num):
        h, w = rng.integers(8, 40, size=2)
        label = (rng.random((h, w)) < rng.uniform(0.02, 0.3)).astype(np.uint8)
        label[rng.random((h, w)) < 0.15] = 255
        if i == 1:
            label[label == 1] = 0  # an image without anomaly
        if i == 2:
            label[:] = 255  # an all-void image
        base = rng.normal(size=(h, w)) + 1.5 * (label == 1)
        if kind == "continuous":
            score = base.astype(np.float32)
        elif kind == "ties":
            score = (np.round(base * 4) / 4).astype(np.float32)
        elif kind == "float16":
            score = (base / 4).astype(np.float16)
        elif kind == "float64":
            score = base
        elif kind == "signed_zero":
            score = np.where(np.abs(base) < 0.5, np.where(rng.random((h, w)) < 0.5, -0.0, 0.0), base).astype(np.float32)
        elif kind == "integer":
            score = np.round(base * 3).astype(np.int64)
        else:
            raise AssertionError(kind)
        score[label == 255] = np.nan if score.dtype.kind == "f" else score[label == 255]  # void is ignored
        scores.append(score)
        labels.append(label)
    return scores, labels


def official_config(reference: dict, case: str, suffix: str) -> tuple[str, dict]:
    track = reference[case]["inputs"]["track"]
    name = ("SegEval-AnomalyTrack" if track == "anomaly" else "SegEval-ObstacleTrack") + suffix
    return track, reference[case]["smiyc_components"][name]


def assert_component_result(result: dict, expected: dict) -> None:
    for ours, theirs in [("siou", "mean_sIoU"), ("ppv", "mean_PPV"), ("siou_pred", "mean_sIoU_pred"),
                         ("mean_f1", "mean_F1")]:
        if expected.get(theirs) is None:
            assert np.isnan(result[ours]), ours
        else:
            assert result[ours] == pytest.approx(expected[theirs], abs=TOL, nan_ok=True), ours
    assert result["f1_per_threshold"] == pytest.approx(expected["F1_per_tau"], abs=TOL)
    assert result["tp_per_threshold"] == [row["TP"] for row in expected["per_tau"]]
    assert result["fn_per_threshold"] == [row["FN"] for row in expected["per_tau"]]
    assert result["fp_per_threshold"] == [row["FP"] for row in expected["per_tau"]]
    assert result["num_gt_components"] == expected["num_gt_components"]
    assert result["num_pred_components"] == expected["num_pred_components"]
