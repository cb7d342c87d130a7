"""Bootstrap intervals from per-image accumulators against a naive resample-and-recompute: for the same seeded
resamples, scikit-learn on the concatenated pixels of the drawn images (pixel metrics) and a fresh component
accumulator fed the drawn images one by one (component metrics)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from mask2anomaly_eval.bootstrap import bootstrap_metrics, resample_indices
from mask2anomaly_eval.metrics import ComponentMetricAccumulator, PixelMetricAccumulator
from mask2anomaly_eval.per_image import add_component_frame, image_record

NUM_RESAMPLES = 40


def _frames(seed: int = 0, num: int = 7, quantize: bool = True):
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(num):
        h, w = 24 + 2 * i, 30
        labels = np.zeros((h, w), np.uint8)
        if i != 3:  # one image without anomaly: its per-image AP is undefined, it still counts in the pool
            top, left = rng.integers(0, h - 10), rng.integers(0, w - 12)
            labels[top:top + 8, left:left + 11] = 1
        labels[rng.random((h, w)) < 0.05] = 255
        scores = rng.random((h, w)).astype(np.float32) + 0.6 * (labels == 1)
        if quantize:  # ties across images, as real score maps have
            scores = (np.round(scores * 64) / 64).astype(np.float32)
        frames.append((scores, labels))
    return frames


def _naive_pixel(frames, rows):
    values = {"auprc": [], "fpr95": [], "auroc": []}
    for row in rows:
        y = np.concatenate([(frames[i][1][frames[i][1] != 255] == 1) for i in row])
        s = np.concatenate([frames[i][0][frames[i][1] != 255] for i in row])
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        values["auprc"].append(average_precision_score(y, s))
        values["auroc"].append(roc_auc_score(y, s))
        values["fpr95"].append(fpr[np.argmax(tpr >= 0.95)])
    return {key: np.array(v) for key, v in values.items()}


@pytest.mark.parametrize("quantize", [True, False])
def test_exact_bootstrap_equals_sklearn_on_resampled_pixels(quantize):
    frames = _frames(quantize=quantize)
    records = [image_record(i, f"f{i}", s, l, keep_state=True) for i, (s, l) in enumerate(frames)]
    result = bootstrap_metrics([r.pixel_state for r in records], num_resamples=NUM_RESAMPLES, seed=5)
    naive = _naive_pixel(frames, resample_indices(len(frames), NUM_RESAMPLES, 5))
    for key, expected in naive.items():
        np.testing.assert_allclose(result["values"][key], expected, rtol=1e-10, atol=1e-12, err_msg=key)
        low, high = np.percentile(expected, [2.5, 97.5])
        assert result["intervals"][key]["low"] == pytest.approx(low, abs=1e-10)
        assert result["intervals"][key]["high"] == pytest.approx(high, abs=1e-10)
        assert result["intervals"][key]["num_defined"] == NUM_RESAMPLES
    assert result["intervals"]["auprc"]["low"] < result["intervals"]["auprc"]["high"]


def test_component_bootstrap_equals_recomputed_resamples():
    frames = _frames(seed=2, quantize=False)
    threshold = 0.8
    total = ComponentMetricAccumulator("obstacle", threshold)
    records = []
    for i, (scores, labels) in enumerate(frames):
        record = image_record(i, f"f{i}", scores, labels, keep_state=True)
        add_component_frame(total, scores, labels, record)
        records.append(record)
    # the per-image route leaves the totals as adding the frames directly does
    direct = ComponentMetricAccumulator("obstacle", threshold)
    for scores, labels in frames:
        direct.add(scores, labels)
    assert total.compute()["mean_f1"] == direct.compute()["mean_f1"]

    result = bootstrap_metrics([r.pixel_state for r in records], [r.component_state for r in records],
                               num_resamples=NUM_RESAMPLES, seed=1)
    for b, row in enumerate(resample_indices(len(frames), NUM_RESAMPLES, 1)):
        again = ComponentMetricAccumulator("obstacle", threshold)
        for i in row:
            again.add(*frames[i])
        expected = again.compute()
        for key in ("siou", "ppv", "mean_f1"):
            assert result["values"][key][b] == pytest.approx(expected[key], rel=1e-12, nan_ok=True), (key, b)


def test_smiyc_mode_bootstrap_equals_merging_resampled_frames():
    frames = _frames(seed=4)
    records = [image_record(i, f"f{i}", s, l, keep_state=True, mode="smiyc_uniform") for i, (s, l) in
               enumerate(frames)]
    result = bootstrap_metrics([r.pixel_state for r in records], num_resamples=10, seed=3)
    for b, row in enumerate(resample_indices(len(frames), 10, 3)):
        again = PixelMetricAccumulator("smiyc_uniform")
        for i in row:
            again.add(*frames[i])
        assert result["values"]["auprc"][b] == pytest.approx(again.compute()["auprc"], rel=1e-12)


def test_per_image_record_against_sklearn_and_numpy():
    scores, labels = _frames(seed=7, num=1)[0]
    record = image_record(0, "f0", scores, labels)
    valid = labels != 255
    assert record.auprc == pytest.approx(average_precision_score(labels[valid] == 1, scores[valid]), rel=1e-12)
    assert record.auroc == pytest.approx(roc_auc_score(labels[valid] == 1, scores[valid]), rel=1e-12)
    assert record.anomalous_area == pytest.approx((labels == 1).sum() / valid.sum())
    assert record.score_max == pytest.approx(scores[valid].max())
    assert record.anomaly_score_mean == pytest.approx(scores[labels == 1].mean(), rel=1e-6)
    no_anomaly = image_record(1, "f1", scores, np.where(labels == 1, 0, labels))
    assert no_anomaly.auprc is None and no_anomaly.fpr95 is None and no_anomaly.anomalous_area == 0


def test_bad_bootstrap_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="at least one"):
        resample_indices(0, 10)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_metrics([PixelMetricAccumulator()], confidence=95)


def test_levels_bound_the_cost_and_stay_close_to_the_exact_resamples():
    frames = _frames(seed=9, num=6, quantize=False)  # ~4800 distinct scores
    records = [image_record(i, f"f{i}", s, l, keep_state=True) for i, (s, l) in enumerate(frames)]
    exact = bootstrap_metrics([r.pixel_state for r in records], num_resamples=NUM_RESAMPLES, seed=2)
    levelled = bootstrap_metrics([r.pixel_state for r in records], num_resamples=NUM_RESAMPLES, seed=2,
                                 max_levels=512)
    assert exact["exact"] and not levelled["exact"] and levelled["score_levels"] <= 512
    naive = _naive_pixel(frames, resample_indices(len(frames), NUM_RESAMPLES, 2))
    for key, expected in naive.items():
        np.testing.assert_allclose(exact["values"][key], expected, rtol=1e-10, atol=1e-12)
        # 512 equal-mass levels: ties within a level move each value by about 1/512
        np.testing.assert_allclose(levelled["values"][key], expected, atol=0.01, err_msg=key)
        assert not np.allclose(levelled["values"][key], expected, rtol=1e-10, atol=1e-12) or key == "fpr95"
