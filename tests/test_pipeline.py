"""Pipelines: the widget's image-segmentation format against a naive per-pixel reference computed here, the
anomaly entry present/absent by the threshold, the float-map pipeline, and both resolved from a saved folder
with trust_remote_code in a subprocess where this package cannot be imported.

The helpers these tests share with the predict/handler tests are in `tiny_models.py`, the fixtures in
`conftest.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from tiny_models import model_outputs, random_image, reference_class_scores, save_tiny_model
from transformers import pipeline

from modeling_mask2anomaly import (
    CITYSCAPES_CLASSES,
)
from modeling_mask2anomaly.pipeline_mask2anomaly import Mask2AnomalyMapPipeline, Mask2AnomalySegmentationPipeline

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------ in process


def _entries(result: list[dict]) -> dict[str, dict]:
    labels = [entry["label"] for entry in result]
    assert len(labels) == len(set(labels)), f"duplicate labels {labels}"
    for entry in result:
        assert set(entry) == {"label", "score", "mask"}
        assert isinstance(entry["score"], float)
        assert isinstance(entry["mask"], Image.Image) and entry["mask"].mode == "L"
        assert set(np.unique(np.asarray(entry["mask"]))) <= {0, 255}
    return {entry["label"]: entry for entry in result}


def test_image_segmentation_format_matches_reference(tmp_path):
    folder = save_tiny_model(tmp_path / "model", "random")
    pipe = pipeline("image-segmentation", model=str(folder), pipeline_class=Mask2AnomalySegmentationPipeline)
    rgb = random_image(40, 60)
    model, processor = pipe.model, pipe.image_processor
    outputs, processed = model_outputs(model, processor, rgb)
    scores = reference_class_scores(outputs, processed, (40, 60))
    semantic = scores.argmax(0).numpy()
    confidence = scores.max(0).values.numpy()
    anomaly = 1.0 - confidence  # mask2anomaly score; "random" weights keep no query confident, so no refinement
    threshold = float(np.median(anomaly))  # about half the image above it

    result = pipe(Image.fromarray(rgb), threshold=threshold, flip_tta=False)
    entries = _entries(result)
    assert result[0]["label"] == "anomaly"
    anomalous = np.asarray(entries["anomaly"]["mask"]) == 255
    assert anomalous.shape == (40, 60)
    # allow the odd pixel within float noise of the threshold
    assert (anomalous != (anomaly > threshold)).mean() < 0.002
    assert entries["anomaly"]["score"] == pytest.approx(anomaly[anomalous].mean(), abs=1e-4)
    classes = [name for name in entries if name != "anomaly"]
    assert classes == [CITYSCAPES_CLASSES[i] for i in np.unique(semantic)]
    covered = np.zeros((40, 60), dtype=int)
    for name in classes:
        inside = np.asarray(entries[name]["mask"]) == 255
        covered += inside
        assert (inside != (semantic == CITYSCAPES_CLASSES.index(name))).mean() < 0.002
        assert entries[name]["score"] == pytest.approx(confidence[inside].mean(), abs=1e-4)
    assert (covered == 1).all(), "class masks must tile the image"


@pytest.mark.parametrize("behaviour, expect_anomaly", [("anomalous", True), ("normal", False)])
def test_anomaly_entry_follows_configured_threshold(tmp_path, behaviour, expect_anomaly):
    folder = save_tiny_model(tmp_path / "model", behaviour)
    pipe = pipeline("image-segmentation", model=str(folder), pipeline_class=Mask2AnomalySegmentationPipeline)
    assert pipe.image_processor.anomaly_threshold == 0.5
    entries = _entries(pipe(random_image(24, 30), flip_tta=False))
    assert ("anomaly" in entries) is expect_anomaly
    if expect_anomaly:
        # every query says "no object": S_c ~ 0 and a(x) = 1 - max_c S_c ~ 1 everywhere
        assert (np.asarray(entries["anomaly"]["mask"]) == 255).all()
        assert entries["anomaly"]["score"] > 0.99
    else:
        assert list(entries) == ["road"]


def test_anomaly_map_pipeline(tmp_path):
    folder = save_tiny_model(tmp_path / "model", "random")
    pipe = pipeline("anomaly-segmentation", model=str(folder), pipeline_class=Mask2AnomalyMapPipeline)
    rgb = random_image(36, 50, seed=3)
    outputs, processed = model_outputs(pipe.model, pipe.image_processor, rgb)
    flipped_outputs, _ = model_outputs(pipe.model, pipe.image_processor, np.ascontiguousarray(rgb[:, ::-1]))
    plain = 1.0 - reference_class_scores(outputs, processed, (36, 50)).max(0).values.numpy()
    flipped = 1.0 - reference_class_scores(flipped_outputs, processed, (36, 50)).max(0).values.numpy()

    result = pipe(rgb, render=True)  # flip TTA on by config
    assert result["anomaly_map"].dtype == np.float32 and result["anomaly_map"].shape == (36, 50)
    np.testing.assert_allclose(result["anomaly_map"], (plain + flipped[:, ::-1]) / 2, atol=1e-5)
    assert result["semantic_map"].dtype == np.uint8 and result["semantic_map"].shape == (36, 50)
    assert result["max_score"] == pytest.approx(float(result["anomaly_map"].max()))
    assert result["anomalous_fraction"] == pytest.approx(float((result["anomaly_map"] > 0.5).mean()))
    assert result["heatmap"].mode == "RGB" and result["heatmap"].width > result["heatmap"].height
    assert result["semantic"].mode == "P" and result["semantic"].size == (50, 36)

    no_flip = pipe(rgb, flip_tta=False)
    np.testing.assert_allclose(no_flip["anomaly_map"], plain, atol=1e-5)
    with pytest.raises(ValueError, match="scorer='oracle'"):
        pipe(rgb, scorer="oracle")
    with pytest.raises(ValueError, match="subtask"):
        pipe(rgb, subtask="panoptic")
    # parameters are named as the processor settings; the older names are aliases
    for name, value in (("anomaly_threshold", 0.3), ("threshold", 0.3)):
        assert pipe(rgb, flip_tta=False, **{name: value})["threshold"] == 0.3
    named = pipe(rgb, flip_tta=False, anomaly_scorer="energy")["anomaly_map"]
    np.testing.assert_array_equal(named, pipe(rgb, flip_tta=False, scorer="energy")["anomaly_map"])
    assert not np.allclose(named, plain, atol=1e-3), "the scorer really changed"
    with pytest.raises(ValueError, match="anomaly_scorer='rba' and its alias scorer='msp'"):
        pipe(rgb, anomaly_scorer="rba", scorer="msp")
    with pytest.raises(ValueError, match="scorer='oracle'"):
        pipe(rgb, anomaly_scorer="oracle")


# ------------------------------------------------------------------------------------------------ remote code


def test_pipelines_from_folder_with_remote_code_only(tmp_path):
    folder = save_tiny_model(tmp_path / "model", "anomalous")
    config = json.loads((folder / "config.json").read_text())
    assert set(config.get("custom_pipelines", {})) == {"image-segmentation", "anomaly-segmentation"}
    for name in ("pipeline_mask2anomaly.py", "visualize.py", "image_processing_mask2anomaly.py"):
        assert (folder / name).is_file(), f"{name} must travel with the model"
    Image.fromarray(random_image(20, 28)).save(tmp_path / "road.png")
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["modeling_mask2anomaly"] = None  # this package must not be needed
        import numpy as np
        from transformers import pipeline
        seg = pipeline("image-segmentation", model={str(folder)!r}, trust_remote_code=True)
        result = seg({str(tmp_path / "road.png")!r})
        maps = pipeline("anomaly-segmentation", model={str(folder)!r}, trust_remote_code=True)
        out = maps({str(tmp_path / "road.png")!r})
        print(json.dumps({{
            "pipeline": type(seg).__module__ + "." + type(seg).__name__,
            "model": type(seg.model).__module__,
            "labels": [r["label"] for r in result],
            "sizes": [list(r["mask"].size) for r in result],
            "anomaly_score": result[0]["score"],
            "map_shape": list(out["anomaly_map"].shape), "map_dtype": str(out["anomaly_map"].dtype),
            "map_min": float(out["anomaly_map"].min()),
        }}))
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["pipeline"].startswith("transformers_modules.") and report["pipeline"].endswith(
        "pipeline_mask2anomaly.Mask2AnomalySegmentationPipeline")
    assert report["model"].startswith("transformers_modules.")
    assert report["labels"][0] == "anomaly" and report["anomaly_score"] > 0.99
    assert all(size == [28, 20] for size in report["sizes"])
    assert report["map_shape"] == [20, 28] and report["map_dtype"] == "float32" and report["map_min"] > 0.99
