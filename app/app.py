"""Gradio Space for Mask2Anomaly: upload a road image, see the anomaly heatmap and the semantic map side by side.

The model comes from `MASK2ANOMALY_MODEL` (a Hub id or a folder; default: the repository's `demo_model/` beside
this folder) and is loaded with its remote code, so the Space needs only transformers, torch, numpy and pillow,
not this package: the pictures are drawn by the model's own remote-code `visualize` module. `predict` is
importable and usable without gradio; gradio is imported only to build the page (`pip install "mask2anomaly[demo]"`
or `app/requirements.txt`). Example images travel inside this folder (`examples/`), so a Space made by copying
`app/` alone shows them.

The page never shows gradio's bare "Error" badges: a press without an image, or an image that cannot be read,
puts a sentence into the summary box instead, and a new upload clears the previous outputs.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image
from transformers import pipeline

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE.parent / "demo_model"
EXAMPLES_DIR = HERE / "examples"
TITLE = "Mask2Anomaly: road-scene anomaly segmentation"
DESCRIPTION = (
    "Mask2Anomaly (Rai et al., ICCV 2023) scores every pixel by how badly the known Cityscapes classes explain it. "
    "Left: anomaly score as a heatmap over the image (the cyan mark on the colour bar is the decision threshold). "
    "Right: the semantic map in Cityscapes colours, with a legend of the classes it shows."
)
NO_IMAGE = "No image yet: upload a road image (or pick an example below), then press Find anomalies."
BUTTON = "Find anomalies"
# Pictures are drawn for the screen: an image larger than this (longer side) is scored at full size, then shown
# shrunk, so that the colour bar's labels keep their size on the page. Both output panels are this tall on the page.
DISPLAY_MAX_SIDE = 1024
PANEL_HEIGHT = 320


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


def visualize_module(pipe: Any) -> ModuleType:
    """The `visualize` module that travels with the pipeline's code (the model's remote code, or the package)."""
    package = type(pipe).__module__.rpartition(".")[0]
    return importlib.import_module(f"{package}.visualize" if package else "visualize")


def _for_display(rgb: np.ndarray, anomaly: np.ndarray, semantic: np.ndarray) -> tuple[np.ndarray, ...]:
    """The image and its maps shrunk so that the longer side is at most `DISPLAY_MAX_SIDE` (bilinear for the image
    and the scores, nearest for the class ids); unchanged when already small enough."""
    height, width = anomaly.shape
    scale = DISPLAY_MAX_SIDE / max(height, width)
    if scale >= 1:
        return rgb, anomaly, semantic
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
    anomaly = np.asarray(Image.fromarray(anomaly.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
    semantic = np.asarray(Image.fromarray(semantic.astype(np.uint8)).resize(size, Image.Resampling.NEAREST))
    return rgb, anomaly, semantic


def _same_width(picture: Image.Image, width: int) -> Image.Image:
    """`picture` widened to `width` with white on the right (unchanged if already as wide): the two pictures of an
    image, equally tall, then also have one aspect ratio and show at one height in panels of one width."""
    if picture.width >= width:
        return picture
    canvas = Image.new("RGB", (width, picture.height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    return canvas


def predict(image: Image.Image | np.ndarray | None, model: str | None = None) -> tuple[Image.Image, Image.Image, str]:
    """
    Heatmap, semantic map with legend and a one-line summary for one image.

    Args:
        image: the uploaded image (PIL or an (H, W, 3) array, as gradio hands it over).
        model: Hub id or folder; default `model_source()`.

    Returns:
        (heatmap RGB image with colour bar, semantic map with its class legend as an RGB image (the same height),
        summary text). The maps are computed at the image's full size; the pictures at most `DISPLAY_MAX_SIDE`
        pixels wide, plus their side panels.

    Raises:
        ValueError: no image.
    """
    if image is None:
        raise ValueError(NO_IMAGE)
    pipe = load_pipeline(model or model_source())
    visualize = visualize_module(pipe)
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    result = pipe(rgb)
    scorer = pipe.image_processor.anomaly_scorer
    threshold = result["threshold"]
    shown_rgb, shown_anomaly, shown_semantic = _for_display(rgb, result["anomaly_map"], result["semantic_map"])
    vmin, vmax = visualize.default_score_range(shown_anomaly, scorer)
    heatmap = visualize.render_heatmap(shown_rgb, shown_anomaly, vmin, vmax, threshold=threshold)
    semantic = visualize.render_semantic_legend(shown_semantic, pipe.model.config.id2label)
    width = max(heatmap.width, semantic.width)
    heatmap, semantic = _same_width(heatmap, width), _same_width(semantic, width)
    low, high = visualize.default_score_range(result["anomaly_map"], scorer)
    summary = (f"{rgb.shape[1]}x{rgb.shape[0]} image: max anomaly score {result['max_score']:.3f} ({scorer} score, "
               f"colour scale {low:g} .. {high:g}); anomalous area {100 * result['anomalous_fraction']:.2f}% "
               f"(score > {threshold:g})")
    return heatmap, semantic, summary


def run(image: Image.Image | np.ndarray | None) -> tuple[Image.Image | None, Image.Image | None, str]:
    """The button's handler: `predict`, with any problem said in the summary box rather than raised (gradio would
    show bare "Error" badges on the outputs and keep the message in the server log)."""
    try:
        return predict(image)
    except (ValueError, OSError, RuntimeError) as err:
        return None, None, f"{err}"


def example_images() -> list[str]:
    """The example images shipped in `examples/` beside this file."""
    return [str(path) for path in sorted(EXAMPLES_DIR.glob("*.png"))]


def build_demo() -> Any:
    """The gradio Blocks page (gradio imported here, so `predict` works where gradio is not installed)."""
    import gradio as gr

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\n{DESCRIPTION}")
        with gr.Row(equal_height=True):
            source = gr.Image(type="pil", label="Road image", height=PANEL_HEIGHT, elem_id="source")
            with gr.Column():
                button = gr.Button(BUTTON, variant="primary")
                summary = gr.Textbox(label="Summary", value=NO_IMAGE, lines=3, interactive=False, elem_id="summary")
        with gr.Row(equal_height=True):
            heatmap = gr.Image(type="pil", label="Anomaly heatmap", height=PANEL_HEIGHT, format="png",
                               interactive=False, elem_id="heatmap")
            semantic = gr.Image(type="pil", label="Semantic map (Cityscapes colours)", height=PANEL_HEIGHT,
                                format="png", interactive=False, elem_id="semantic")
        button.click(run, inputs=source, outputs=[heatmap, semantic, summary])
        # a new image clears the previous outputs, which belong to another picture
        source.change(lambda image: (None, None, "Press Find anomalies." if image is not None else NO_IMAGE),
                      inputs=source, outputs=[heatmap, semantic, summary])
        examples = example_images()
        if examples:
            gr.Examples([[path] for path in examples], inputs=source, label="Examples (SynthRoad scenes)")
    return demo


if __name__ == "__main__":
    build_demo().launch()
