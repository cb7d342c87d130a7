"""Pipelines: the widget's image-segmentation format against a naive per-pixel reference computed here, the
anomaly entry present/absent by the threshold, the float-map pipeline, and both resolved from a saved folder
with trust_remote_code in a subprocess where this package cannot be imported.

Also the helpers the predict/handler/app tests share: a tiny saved model whose class head can be steered, and
the naive reference (upsample, sigmoid, class-weighted sum, crop, resize; method.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import dynamic_module_utils, pipeline

from modeling_mask2anomaly import (
    CITYSCAPES_CLASSES,
    Mask2AnomalyConfig,
    Mask2AnomalyForUniversalSegmentation,
    Mask2AnomalyImageProcessor,
)
from modeling_mask2anomaly.pipeline_mask2anomaly import Mask2AnomalyMapPipeline, Mask2AnomalySegmentationPipeline

# Small working size so the CPU tests stay fast; the rule (shortest side, longest cap) is the official one.
TEST_SIZE = {"shortest_edge": 64, "longest_edge": 128}
NO_OBJECT = len(CITYSCAPES_CLASSES)
SKY = CITYSCAPES_CLASSES.index("sky")
ROAD = CITYSCAPES_CLASSES.index("road")


def tiny_model(behaviour: str = "random", seed: int = 0) -> Mask2AnomalyForUniversalSegmentation:
    """
    A tiny Mask2Anomaly model in eval mode with a steered class head:

    - "random": as initialised (scores near 0.5, nothing confident);
    - "anomalous": every query says "no object" -> S_c ~ 0, anomaly ~ 1 everywhere;
    - "normal": every query says "road" confidently -> S_road = sum_q sigmoid(m_q) >> 1, anomaly far below 0;
    - "refining": about half the queries say "sky" with probability > 0.95 (kept by refinement), the rest mostly
      "no object", so refinement zeroes part of a map that is otherwise high.
    """
    torch.manual_seed(seed)
    model = Mask2AnomalyForUniversalSegmentation(Mask2AnomalyConfig.tiny()).eval()
    head = model.class_predictor
    with torch.no_grad():
        if behaviour == "anomalous":
            head.bias[NO_OBJECT] = 20.0
        elif behaviour == "normal":
            head.bias[ROAD] = 20.0
        elif behaviour == "refining":
            direction = torch.randn(head.in_features)
            head.weight[SKY] = 40.0 * direction / direction.norm()
            head.bias[NO_OBJECT] = 4.0
        elif behaviour != "random":
            raise ValueError(f"unknown behaviour {behaviour!r}")
    return model


def save_tiny_model(folder: Path, behaviour: str = "random", **processor_kwargs) -> Path:
    """Save a steered tiny model and its processor (small working size) as a model folder."""
    model = tiny_model(behaviour)
    settings = {"size": dict(TEST_SIZE), **processor_kwargs}
    processor = Mask2AnomalyImageProcessor.from_model_config(model.config, **settings)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def model_outputs(model, processor: Mask2AnomalyImageProcessor, rgb: np.ndarray, do_resize: bool = True):
    """Run the model on one (H, W, 3) uint8 image; returns the outputs and the un-padded processed size."""
    inputs = processor(rgb, do_resize=do_resize, return_tensors="pt")
    with torch.no_grad():
        outputs = model(pixel_values=inputs["pixel_values"])
    processed = processor.get_resized_size(rgb.shape[:2]) if do_resize else rgb.shape[:2]
    return outputs, tuple(int(v) for v in processed)


def reference_class_scores(outputs, processed: tuple[int, int], original: tuple[int, int]) -> torch.Tensor:
    """Naive S_c(x) (C, H, W) at the original size: every mask upsampled at once (fine at test sizes)."""
    probs = outputs.class_queries_logits[0].softmax(-1)[:, :-1]  # (Q, C), softmax over C+1 columns
    masks = outputs.masks_queries_logits[0]  # (Q, h, w)
    padded = (4 * masks.shape[-2], 4 * masks.shape[-1])
    up = F.interpolate(masks[None], size=padded, mode="bilinear", align_corners=False)[0].sigmoid()
    scores = torch.einsum("qc,qhw->chw", probs, up)[:, : processed[0], : processed[1]]
    return F.interpolate(scores[None], size=original, mode="bilinear", align_corners=False)[0]


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One torch thread: the tiny models run ~8x faster than with threads fighting over a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def isolated_remote_code(tmp_path, monkeypatch) -> Iterator[Path]:
    """Remote code loaded in this process goes to a temporary modules cache and is forgotten afterwards."""
    cache = tmp_path / "hf_modules"
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
        monkeypatch.delitem(sys.modules, name)
    yield cache
    for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
        del sys.modules[name]


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
