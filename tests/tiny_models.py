"""Shared test helpers: a tiny Mask2Anomaly whose class head can be steered, saved as a model folder, and the naive
reference of the class channels S_c (upsample, sigmoid, class-weighted sum, crop, resize; method.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modeling_mask2anomaly import (
    CITYSCAPES_CLASSES,
    Mask2AnomalyConfig,
    Mask2AnomalyForUniversalSegmentation,
    Mask2AnomalyImageProcessor,
)

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


# ------------------------------------------------------------------------------------------- training
# Tiny scenes and the tiny model; one image per 64x128 crop, no loader workers (process start-up would
# dominate), no periodic evaluation or checkpoints unless a test asks for them.
TINY_TRAINING = [
    "model.preset=tiny",
    "model.config={}",
    "processor.size={shortest_edge: 64, longest_edge: 128}",
    "data.train={source: synthroad, split: train, num: 8, seed: 0, height: 64, width: 128}",
    "data.outliers={source: synthroad, num: 4, seed: 0, height: 64, width: 128}",
    "data.validation={}",
    "data.crop_size=[64, 128]",
    "data.num_workers=0",
    "stage1.batch_size=2",
    "stage2.batch_size=2",
    "training.logging_steps=1",
    "training.checkpoint_steps=0",
    "training.eval_steps=0",
]
ANOMALY_SPLIT = "data.validation.anomaly={source: synthroad, split: anomaly, num: 2, seed: 1, height: 64, width: 128}"


def tiny_config(*overrides: str):
    """The packaged synthroad training config with `TINY_TRAINING` and then `overrides` applied."""
    from mask2anomaly_training.config import load_config

    return load_config("synthroad", [*TINY_TRAINING, *overrides])


# ------------------------------------------------------------------------------------------- evaluation
def synthroad_eval_setup(root: Path, num_images: int, seed: int = 3):
    """A small SynthRoad anomaly split (64x128) in ``root/synthroad`` and a random tiny model (seed 0) with a
    small-size processor saved in ``root/model``, for the evaluation tests:
    ``(data_dir, model, processor, image_paths, label_arrays)``."""
    from PIL import Image

    from mask2anomaly_training.synthroad import main as synthroad_main

    data = root / "synthroad"
    assert synthroad_main(["--split", "anomaly", "--num", str(num_images), "--height", "64", "--width", "128",
                           "--seed", str(seed), "--output-dir", str(data)]) == 0
    torch.manual_seed(0)
    model = Mask2AnomalyForUniversalSegmentation(Mask2AnomalyConfig.tiny()).eval()
    processor = Mask2AnomalyImageProcessor(size=dict(TEST_SIZE))
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    images = sorted((data / "images").glob("*.png"))
    labels = [np.array(Image.open(data / "labels" / p.name)) for p in images]
    return data, model, processor, images, labels

