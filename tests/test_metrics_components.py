"""Component metrics (SegmentMeIfYouCan sIoU / PPV / mean F1) and the two-pass API: against the official fixture
values, per image, and against a naive reference written from the official definition."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from metric_cases import CASES, FIXTURES, assert_component_result, load_case, official_config
from scipy import ndimage

from mask2anomaly_eval.metrics import (
    ComponentMetricAccumulator,
    compute_metrics,
    evaluate_two_pass,
    frame_component_stats,
    merge_accumulators,
)

TOL = 1e-9
CONFIG_SUFFIXES = ["", "@thresh_p=0.5", "@exact_best_F1_threshold"]
PER_IMAGE_KEYS = {"sIoU_gt": "siou_gt", "size_gt": "size_gt", "PPV_pred": "ppv_pred", "sIoU_pred": "siou_pred",
                  "size_pred": "size_pred"}


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((FIXTURES / "expected_metrics.json").read_text())["cases"]


@pytest.mark.parametrize("suffix", CONFIG_SUFFIXES)
@pytest.mark.parametrize("case", CASES)
def test_components_match_official_fixture(case, suffix, reference):
    track, expected = official_config(reference, case, suffix)
    accumulator = ComponentMetricAccumulator(track, expected["thresh_p"])
    scores, labels = load_case(case)
    per_image = [accumulator.add(s, l) for s, l in zip(scores, labels)]
    assert_component_result(accumulator.compute(), expected)
    for ours, theirs in zip(per_image, expected["per_image"]):
        for their_key, our_key in PER_IMAGE_KEYS.items():
            np.testing.assert_allclose(getattr(ours, our_key), theirs[their_key], atol=TOL, rtol=0)
            assert len(getattr(ours, our_key)) == len(theirs[their_key])


@pytest.mark.parametrize("case", CASES)
def test_two_pass_official_protocol(case, reference):
    """mode='smiyc': the components use the SMIYC curve's best-F1 threshold, exactly as the official run."""
    track, expected = official_config(reference, case, "")
    scores, labels = load_case(case)
    result = compute_metrics(scores, labels, mode="smiyc", components=True, track=track)
    assert result["component_threshold"] == expected["thresh_p"]
    assert_component_result(result, expected)
    streamed = evaluate_two_pass(lambda: zip(scores, labels), mode="smiyc", track=track)
    assert streamed["mean_f1"] == result["mean_f1"] and streamed["auprc"] == result["auprc"]


def test_two_pass_exact_mode_uses_exact_threshold(reference):
    track, expected = official_config(reference, "obstacle_track", "@exact_best_F1_threshold")
    result = compute_metrics(*load_case("obstacle_track"), mode="exact", components=True, track=track)
    assert result["component_threshold"] == expected["thresh_p"]
    assert_component_result(result, expected)


@pytest.mark.parametrize("case", CASES)
def test_float16_pipeline_components(case, reference):
    """The SMIYC pipeline stores float16 scores: curve, threshold (rounded to float16) and components follow."""
    track, _ = official_config(reference, case, "")
    name = "SegEval-AnomalyTrack" if track == "anomaly" else "SegEval-ObstacleTrack"
    expected = reference[case]["smiyc_pipeline_float16"][name]
    scores, labels = load_case(case)
    result = compute_metrics(scores, labels, mode="smiyc", components=True, track=track, cast_float16=True)
    assert result["component_threshold"] == expected["thresh_p"]
    # This entry has no sIoU_pred; compare everything it has.
    assert_component_result(result, {"mean_sIoU_pred": result["siou_pred"], **expected})


# ---------------------------------------------------------------------------------------------------------------
# Naive reference: the official definition step by step, one component at a time with set operations
# ---------------------------------------------------------------------------------------------------------------


def naive_frame(scores, labels, threshold, min_pred, min_gt) -> dict:
    eight = np.ones((3, 3), dtype=int)
    predicted = (scores > scores.dtype.type(threshold)) & (labels != 255)
    gt, num_gt = ndimage.label(labels == 1, eight)
    pred, num_pred = ndimage.label(predicted, eight)
    for c in range(1, num_pred + 1):
        if np.sum(pred == c) < min_pred:
            pred[pred == c] = 0
    labels = labels.copy()
    for c in range(num_gt + 1):  # component 0 too, as the official loop
        if np.sum(gt == c) < min_gt:
            labels[gt == c] = 255
    roi = labels < 255
    gt, pred = gt[roi], pred[roi]
    out = {k: [] for k in PER_IMAGE_KEYS.values()}
    for k in np.unique(gt[gt > 0]):
        out["siou_gt"].append(naive_siou(gt, pred, k)[0])
        out["size_gt"].append(np.sum(gt == k))
    for j in np.unique(pred[pred > 0]):
        siou, inter = naive_siou(pred, gt, j)
        out["siou_pred"].append(siou)
        out["ppv_pred"].append(inter / np.sum(pred == j))
        out["size_pred"].append(np.sum(pred == j))
    return out


def naive_siou(mine: np.ndarray, theirs: np.ndarray, k: int) -> tuple[float, int]:
    """sIoU of component k of `mine` against the components of `theirs` touching it, and the intersection."""
    touching = np.unique(theirs[(mine == k) & (theirs > 0)])
    in_c = np.isin(theirs, touching)
    inter = np.sum((mine == k) & in_c)
    adjustment = np.sum(~np.isin(mine, [0, k]) & in_c)
    return inter / (np.sum(in_c) + np.sum(mine == k) - inter - adjustment), inter


def blobby_frame(rng: np.random.Generator, shape=(48, 64)) -> tuple[np.ndarray, np.ndarray]:
    gt = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.55
    labels = gt.astype(np.uint8)
    labels[ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.6] = 255
    scores = ndimage.gaussian_filter(rng.random(shape) + 0.8 * gt, 1.5).astype(np.float32)
    return scores, labels


@pytest.mark.parametrize("seed", range(6))
def test_frame_stats_equal_naive_reference(seed):
    rng = np.random.default_rng(seed)
    scores, labels = blobby_frame(rng)
    if seed == 5:
        labels[:] = np.where(labels == 255, 255, 1)
        labels[0, :3] = 0  # background smaller than min_gt_size: voided too, like the official loop
    threshold = float(np.quantile(scores, rng.uniform(0.4, 0.8)))
    min_pred, min_gt = int(rng.integers(1, 30)), int(rng.integers(1, 12))
    ours = frame_component_stats(scores, labels, threshold, min_pred, min_gt)
    expected = naive_frame(scores, labels, threshold, min_pred, min_gt)
    for key, values in expected.items():
        np.testing.assert_allclose(getattr(ours, key), np.asarray(values, dtype=float), atol=1e-12, rtol=0)
        assert len(getattr(ours, key)) == len(values)


def test_threshold_is_strict_and_compared_in_the_score_dtype():
    scores = np.full((30, 30), 0.5, np.float32)
    scores[5:15, 5:15] = np.float32(0.7)
    labels = np.zeros((30, 30), np.uint8)
    labels[5:15, 5:15] = 1
    at_threshold = frame_component_stats(scores, labels, float(np.float32(0.7)), 10, 10)
    assert at_threshold.size_pred.size == 0 and at_threshold.siou_gt.tolist() == [0.0]
    # 0.7 as a Python float is above float32(0.7); compared in float32 they are equal, so nothing is predicted.
    assert frame_component_stats(scores, labels, 0.7, 10, 10).size_pred.size == 0
    below = frame_component_stats(scores, labels, 0.69, 10, 10)
    assert below.siou_gt.tolist() == [1.0] and below.ppv_pred.tolist() == [1.0]


def test_merge_and_state_round_trip_equal_one_accumulator():
    scores, labels = load_case("anomaly_track")
    single = ComponentMetricAccumulator("anomaly", 0.5)
    parts = [ComponentMetricAccumulator("anomaly", 0.5) for _ in range(2)]
    for i, (s, l) in enumerate(zip(scores, labels)):
        single.add(s, l)
        parts[i % 2].add(s, l)
    expected = single.compute()
    merged = merge_accumulators([ComponentMetricAccumulator.from_state_dict(p.state_dict()) for p in parts]).compute()
    unpickled = pickle.loads(pickle.dumps(single)).compute()
    for result in (merged, unpickled):
        for key in ("siou", "ppv", "mean_f1", "num_gt_components", "num_images"):
            assert result[key] == pytest.approx(expected[key], abs=1e-12), key
        assert result["f1_per_threshold"] == pytest.approx(expected["f1_per_threshold"])


def test_component_misuse_raises():
    scores, labels = np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match="threshold is not set"):
        ComponentMetricAccumulator().add(scores, labels)
    with pytest.raises(ValueError, match="track"):
        ComponentMetricAccumulator("lanes")
    with pytest.raises(ValueError, match="2-D"):
        ComponentMetricAccumulator(threshold=0.5).add(scores.ravel(), labels.ravel())
    accumulator = ComponentMetricAccumulator(threshold=0.5)
    accumulator.add(scores, labels)
    with pytest.raises(ValueError, match="cannot change the threshold"):
        accumulator.threshold = 0.4
    other = ComponentMetricAccumulator("obstacle", 0.5)
    other.add(scores, labels)
    with pytest.raises(ValueError, match="same settings"):
        accumulator.merge(other)
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        compute_metrics([scores], [labels, labels])
    with pytest.raises(ValueError, match="no best-F1 threshold"):
        compute_metrics([scores], [labels], components=True)


def test_no_component_anywhere_gives_nan_f1():
    accumulator = ComponentMetricAccumulator(threshold=0.9)
    accumulator.add(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8))
    result = accumulator.compute()
    assert np.isnan(result["mean_f1"]) and np.isnan(result["siou"]) and np.isnan(result["ppv"])
