"""Gradio Space for Mask2Anomaly: upload a road image, see the anomaly heatmap and the semantic map side by side.

The model comes from `MASK2ANOMALY_MODEL` (a Hub id or a folder; default: the repository's `demo_model/` beside
this folder) and is loaded with its remote code, so the Space needs only transformers, torch, numpy, pillow and
scipy, not this package. `predict` is importable and usable without gradio; gradio is imported only to build the
page (`pip install "mask2anomaly[demo]"` or `app/requirements.txt`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transformers import pipeline

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "demo_model"
TITLE = "Mask2Anomaly: road-scene anomaly segmentation"
DESCRIPTION = (
    "Mask2Anomaly (Rai et al., ICCV 2023) scores every pixel by how badly the known Cityscapes classes explain it. "
    "Left: anomaly score as a heatmap over the image (the cyan mark on the colour bar is the decision threshold). "
    "Right: the semantic map in Cityscapes colours."
)


def model_source() -> str:
    """The model to serve: `MASK2ANOMALY_MODEL` if set, else the bundled demo model folder."""
    source = os.environ.get("MASK2ANOMALY_MODEL")
    if source:
        return source
    if DEFAULT_MODEL.is_dir():
        return str(DEFAULT_MODEL)
    raise RuntimeError(f"No model: set MASK2ANOMALY_MODEL to a Hub id or a model folder (the default "
                       f"{DEFAULT_MODEL} does not exist)")


@functools.lru_cache(maxsize=4)
def load_pipeline(source: str) -> Any:
    """The model's `anomaly-segmentation` pipeline (loaded once per source)."""
    return pipeline("anomaly-segmentation", model=source, trust_remote_code=True)


def predict(image: Image.Image | np.ndarray, model: str | None = None) -> tuple[Image.Image, Image.Image, str]:
    """
    Heatmap, semantic map and a one-line summary for one image.

    Args:
        image: the uploaded image (PIL or an (H, W, 3) array, as gradio hands it over).
        model: Hub id or folder; default `model_source()`.

    Returns:
        (heatmap RGB image with colour bar, semantic map as an RGB image, summary text).
    """
    if image is None:
        raise ValueError("No image: upload a road image first")
    pipe = load_pipeline(model or model_source())
    result = pipe(image, render=True)
    semantic = result["semantic_map"]
    id2label = pipe.model.config.id2label
    ids, counts = np.unique(semantic, return_counts=True)
    order = np.argsort(-counts)[:5]
    classes = ", ".join(f"{id2label.get(int(ids[i]), str(int(ids[i])))} {100 * counts[i] / semantic.size:.0f}%"
                        for i in order)
    summary = (f"max anomaly score {result['max_score']:.3f}; anomalous area "
               f"{100 * result['anomalous_fraction']:.2f}% (score > {result['threshold']:g}); "
               f"largest classes: {classes}")
    return result["heatmap"], result["semantic"].convert("RGB"), summary


def build_demo() -> Any:
    """The gradio Blocks page (gradio imported here, so `predict` works where gradio is not installed)."""
    import gradio as gr

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\n{DESCRIPTION}")
        with gr.Row():
            source = gr.Image(type="pil", label="Road image")
        button = gr.Button("Find anomalies", variant="primary")
        with gr.Row():
            heatmap = gr.Image(type="pil", label="Anomaly heatmap")
            semantic = gr.Image(type="pil", label="Semantic map (Cityscapes colours)")
        summary = gr.Textbox(label="Summary")
        button.click(lambda image: predict(image), inputs=source, outputs=[heatmap, semantic, summary])
        examples = sorted((Path(__file__).resolve().parent.parent / "samples").glob("*.png"))
        if examples:
            gr.Examples([[str(path)] for path in examples[:6]], inputs=source)
    return demo


if __name__ == "__main__":
    build_demo().launch()
