"""The `evaluate` metric module at eval/anomaly_segmentation, end to end through `evaluate.load`."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from metric_cases import (
    FIXTURES,
    assert_component_result,
    assert_matches_sklearn,
    load_case,
    official_config,
    random_frames,
    sklearn_reference,
)

evaluate = pytest.importorskip("evaluate")
MODULE = str(Path(__file__).resolve().parents[1] / "eval" / "anomaly_segmentation")


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((FIXTURES / "expected_metrics.json").read_text())["cases"]


def load(**kwargs):
    return evaluate.load(MODULE, **kwargs)


def test_compute_on_lists_of_varying_size_equals_sklearn():
    scores, labels = random_frames("continuous", 8)
    metric = load()
    result = metric.compute(predictions=scores, references=labels)
    assert_matches_sklearn(result, sklearn_reference(scores, labels))
    assert metric.writer is None  # nothing went through evaluate's Arrow cache


def test_add_and_add_batch_stream_then_reset():
    scores, labels = random_frames("ties", 9)
    metric = load()
    metric.add(prediction=scores[0], reference=labels[0])
    metric.add_batch(predictions=scores[1:4], references=labels[1:4])
    assert len(metric) == 4
    result = metric.compute(predictions=scores[4:], references=labels[4:])
    assert_matches_sklearn(result, sklearn_reference(scores, labels))
    with pytest.raises(ValueError, match="no image"):
        metric.compute()  # compute() resets, as evaluate metrics do


def test_nested_python_lists():
    metric = load()
    result = metric.compute(predictions=[[[0.1, 0.9], [0.2, 0.8]], [[0.3, 0.7, 0.05]]],
                            references=[[[0, 1], [0, 255]], [[0, 1, 0]]])
    assert (result["auprc"], result["auroc"], result["fpr95"]) == (1.0, 1.0, 0.0)


@pytest.mark.parametrize("case", ["anomaly_track", "obstacle_track_coarse_ties"])
def test_components_streamed_and_in_one_call_match_official(case, reference):
    track, expected = official_config(reference, case, "")
    scores, labels = load_case(case)
    streamed = load(mode="smiyc", components=True, track=track)
    for s, l in zip(scores, labels):
        streamed.add(prediction=s, reference=l)
    assert_component_result(streamed.compute(), expected)
    one_call = load().compute(predictions=scores, references=labels, mode="smiyc", components=True, track=track)
    assert_component_result(one_call, expected)
    assert one_call["auprc"] == pytest.approx(reference[case]["smiyc_pixel_binned"]["PixBinaryClass"]["AP"], abs=1e-9)


def test_fixed_component_threshold_streams_components(reference):
    track, expected = official_config(reference, "anomaly_track", "@thresh_p=0.5")
    metric = load(components=True, component_threshold=0.5)
    scores, labels = load_case("anomaly_track")
    metric.add_batch(predictions=scores, references=labels)
    assert metric._kept is None  # nothing kept: the threshold was known
    assert_component_result(metric.compute(), expected)


def test_several_processes_merge_on_process_zero(tmp_path):
    scores, labels = random_frames("ties", 12)
    experiment = uuid.uuid4().hex
    workers = [load(num_process=2, process_id=i, experiment_id=experiment, cache_dir=str(tmp_path)) for i in (0, 1)]
    workers[1].add_batch(predictions=scores[:3], references=labels[:3])
    assert workers[1].compute() is None
    result = workers[0].compute(predictions=scores[3:], references=labels[3:])
    assert_matches_sklearn(result, sklearn_reference(scores, labels))


def test_module_errors():
    metric = load()
    with pytest.raises(ValueError, match=r"\[3\]"):
        metric.add(prediction=np.zeros((2, 2)), reference=np.full((2, 2), 3))
    with pytest.raises(ValueError, match="mode"):
        load(mode="approximate")
    streamed = load()
    streamed.add(prediction=np.zeros((2, 2)), reference=np.eye(2, dtype=np.uint8))
    with pytest.raises(ValueError, match="not kept"):
        streamed.compute(mode="smiyc")
    streamed.add(prediction=np.zeros((2, 2)), reference=np.eye(2, dtype=np.uint8))
    with pytest.raises(ValueError, match="were not kept"):
        streamed.compute(components=True)
    with pytest.raises(ValueError, match="unknown compute"):
        load().compute(predictions=[np.zeros(2)], references=[np.zeros(2)], bins=10)


def test_several_processes_never_unpickle_a_planted_shard(tmp_path):
    """Process 0 reads the other processes' shards as plain arrays: a pickle planted under a shard's name (the
    old ``.m2a.pkl`` and the current ``.m2a.npz``) is refused with an error naming it, and runs nothing."""
    from hostile_files import plant_pickle

    scores, labels = random_frames("ties", 4)
    experiment = uuid.uuid4().hex
    metric = load(num_process=2, process_id=0, experiment_id=experiment, cache_dir=str(tmp_path))
    marker = tmp_path / "code-ran"
    for suffix in (".m2a.pkl", ".m2a.npz"):
        plant_pickle(Path(metric.data_dir) / f"{experiment}-2-1{suffix}", marker)
    metric.timeout = 2
    with pytest.raises(ValueError, match=r"-2-1\.m2a\.npz"):
        metric.compute(predictions=scores, references=labels)
    assert not marker.exists()


def test_several_processes_merge_fixed_threshold_components(tmp_path, reference):
    """The component accumulators travel between processes as arrays too."""
    track, expected = official_config(reference, "anomaly_track", "@thresh_p=0.5")
    scores, labels = load_case("anomaly_track")
    experiment = uuid.uuid4().hex
    workers = [load(num_process=2, process_id=i, experiment_id=experiment, cache_dir=str(tmp_path), components=True,
                    component_threshold=0.5) for i in (0, 1)]
    half = len(scores) // 2
    workers[1].add_batch(predictions=scores[:half], references=labels[:half])
    assert workers[1].compute() is None
    assert_component_result(workers[0].compute(predictions=scores[half:], references=labels[half:]), expected)
