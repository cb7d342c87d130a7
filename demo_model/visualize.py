"""Pictures of Mask2Anomaly predictions: anomaly heatmaps with a colour bar, and Cityscapes palette maps.

Used by the `mask2anomaly-predict` CLI, the `anomaly-segmentation` pipeline (``render=True``) and the Space app.
Only numpy, PIL and its sibling scorer registry (which needs torch): this file travels to the Hub as remote code
with the pipeline, so a Space or an endpoint can draw the same pictures without this package installed. Large images are drawn in blocks of rows so that the
extra memory stays a few times the size of the output picture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .scorers import SCORERS, get_scorer

# Cityscapes train-id colours (the official `labels.py` palette), in CITYSCAPES_CLASSES order.
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128),  # road
    (244, 35, 232),  # sidewalk
    (70, 70, 70),  # building
    (102, 102, 156),  # wall
    (190, 153, 153),  # fence
    (153, 153, 153),  # pole
    (250, 170, 30),  # traffic light
    (220, 220, 0),  # traffic sign
    (107, 142, 35),  # vegetation
    (152, 251, 152),  # terrain
    (70, 130, 180),  # sky
    (220, 20, 60),  # person
    (255, 0, 0),  # rider
    (0, 0, 142),  # car
    (0, 0, 70),  # truck
    (0, 60, 100),  # bus
    (0, 80, 100),  # train
    (0, 0, 230),  # motorcycle
    (119, 11, 32),  # bicycle
)

# Control points of an "inferno"-like perceptually ordered map (black - purple - red - orange - pale yellow):
# lightness rises monotonically, so the map reads in grayscale and for colour-blind viewers.
_INFERNO_STOPS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 4),
    (31, 12, 72),
    (85, 15, 109),
    (136, 34, 106),
    (186, 54, 85),
    (227, 89, 51),
    (249, 140, 10),
    (249, 201, 50),
    (252, 255, 164),
)

# Scorers with a fixed score range; every scorer (these and the unbounded rba, max_logit, energy) has a fixed colour
# scale, the registry's `display_range`.
BOUNDED_SCORERS: tuple[str, ...] = tuple(name for name, scorer in SCORERS.items() if scorer.bounded)

# Rows of the output picture drawn per block (bounded memory on huge images).
_BLOCK_ROWS = 512


def colormap_lut(stops: Sequence[tuple[int, int, int]] = _INFERNO_STOPS, size: int = 256) -> np.ndarray:
    """A (size, 3) uint8 lookup table interpolating `stops` linearly at equal spacing."""
    if len(stops) < 2 or size < 2:
        raise ValueError(f"Expected at least 2 colour stops and a size of at least 2; got {len(stops)} and {size}")
    stops_array = np.asarray(stops, dtype=np.float64)
    positions = np.linspace(0.0, 1.0, len(stops_array))
    t = np.linspace(0.0, 1.0, size)
    channels = [np.interp(t, positions, stops_array[:, c]) for c in range(3)]
    return np.clip(np.round(np.stack(channels, axis=1)), 0, 255).astype(np.uint8)


INFERNO_LUT: np.ndarray = colormap_lut()


def anomaly_mask(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels called anomalous at `threshold`: the score strictly exceeds it (one definition for every output)."""
    return np.asarray(anomaly_map) > threshold


def anomaly_summary(anomaly_map: np.ndarray, threshold: float) -> dict[str, float]:
    """Max score, and the fraction and mean score of the pixels above `threshold` (mean is NaN when there are none)."""
    scores = np.asarray(anomaly_map, dtype=np.float32)
    if scores.size == 0:
        raise ValueError("Expected a non-empty anomaly map")
    mask = anomaly_mask(scores, threshold)
    count = int(mask.sum())
    return {
        "max_score": float(scores.max()),
        "anomalous_fraction": count / scores.size,
        "mean_anomalous_score": float(scores[mask].mean()) if count else float("nan"),
    }


def default_score_range(anomaly_map: np.ndarray, scorer: str) -> tuple[float, float]:
    """(vmin, vmax) of the colour scale of `scorer`'s heatmaps: its registered `display_range`, the same for every
    image (so that a normal image does not look anomalous; `anomaly_map` is not read, values outside are drawn in
    the end colours)."""
    return get_scorer(scorer, "scorer").display_range


def _scale(scores: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Scores -> LUT indices 0..255 (clipped to the range)."""
    t = (scores.astype(np.float32) - vmin) / max(vmax - vmin, 1e-12)
    return np.clip(np.round(t * 255.0), 0, 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at `size` pixels (scalable on Pillow >= 10.1, the fixed bitmap font otherwise)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def _tick_label(value: float, span: float) -> str:
    if abs(value) >= 100:
        return f"{value:.3g}"
    return f"{value:.2f}" if span <= 2 else f"{value:.1f}"


# Legibility at any input size: pictures are enlarged (nearest, integer factor) to at least MIN_PICTURE_HEIGHT
# rows, so that the side panel (colour bar or legend) always fits beside the picture, never below it; labels are
# LABEL_HEIGHT_FRACTION of the picture's height, at least MIN_FONT_SIZE pixels, so that they stay readable when
# a large picture is shown shrunk to a screen.
MIN_PICTURE_HEIGHT = 160
MIN_FONT_SIZE = 14
LABEL_HEIGHT_FRACTION = 1 / 24
_MAX_FACTOR = 16


def display_factor(height: int, width: int, min_display_size: int = 256) -> int:
    """The integer enlargement of an (height, width) picture: its longer side reaches `min_display_size` and its
    height `MIN_PICTURE_HEIGHT` (at most 16x; a picture still shorter gets a smaller font, never a taller canvas)."""
    if height < 1 or width < 1:
        raise ValueError(f"Expected a picture of at least 1 x 1 pixels; got {height} x {width}")
    factor = max(math.ceil(min_display_size / max(height, width)), math.ceil(MIN_PICTURE_HEIGHT / height), 1)
    return min(factor, _MAX_FACTOR)


def label_font_size(picture_height: int) -> int:
    """Font size of the side panel's labels for a picture `picture_height` rows tall (after enlargement)."""
    size = max(MIN_FONT_SIZE, round(picture_height * LABEL_HEIGHT_FRACTION))
    return max(4, min(size, picture_height // 6))  # only a picture under 84 rows (a 16x-enlarged sliver) goes below


def _colour_bar(height: int, vmin: float, vmax: float, threshold: float | None, lut: np.ndarray) -> Image.Image:
    """A white panel `height` tall with a vertical colour bar (high at the top), tick labels and a threshold mark."""
    font_size = label_font_size(height)
    margin = max(4, font_size // 2)
    bar_width = max(8, font_size)
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    top, bottom = margin + font_size // 2, height - margin - font_size // 2
    bar_length = max(bottom - top, 2)
    # 5 ticks where their labels fit one above the other, fewer on a short bar
    num_ticks = int(min(5, max(2, bar_length // (1.4 * font_size) + 1)))
    ticks = np.linspace(vmin, vmax, num_ticks)
    labels = [_tick_label(v, vmax - vmin) for v in ticks]
    label_width = max(int(math.ceil(probe.textlength(text, font=font))) for text in labels)
    tick_length = max(3, font_size // 2)
    width = margin + bar_width + tick_length + margin // 2 + label_width + margin
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    rows = np.linspace(1.0, 0.0, bar_length)  # top of the bar = highest score
    strip = lut[np.clip(np.round(rows * (len(lut) - 1)), 0, len(lut) - 1).astype(np.int64)]
    panel.paste(Image.fromarray(np.repeat(strip[:, None, :], bar_width, axis=1)), (margin, top))
    draw = ImageDraw.Draw(panel)
    x_bar_end = margin + bar_width
    span = max(vmax - vmin, 1e-12)

    def y_of(value: float) -> int:
        return int(round(top + (1.0 - (value - vmin) / span) * (bar_length - 1)))

    line_width = max(1, font_size // 10)
    for value, text in zip(ticks, labels):
        y = y_of(value)
        draw.line([(x_bar_end, y), (x_bar_end + tick_length, y)], fill=(0, 0, 0), width=line_width)
        draw.text((x_bar_end + tick_length + margin // 2, y), text, fill=(0, 0, 0), font=font, anchor="lm")
    if threshold is not None and vmin <= threshold <= vmax:
        # the decision threshold as a cyan line across the bar: it stands out against every inferno colour
        y = y_of(threshold)
        draw.line([(margin - 2, y), (x_bar_end + 1, y)], fill=(0, 255, 255), width=max(2, font_size // 6))
    draw.rectangle([margin - 1, top - 1, x_bar_end, top + bar_length], outline=(0, 0, 0), width=line_width)
    return panel


def _beside(picture: np.ndarray, panel: Image.Image) -> Image.Image:
    """The (H, W, 3) picture with the panel (H rows tall) to its right."""
    canvas = Image.new("RGB", (picture.shape[1] + panel.width, picture.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(picture), (0, 0))
    canvas.paste(panel, (picture.shape[1], 0))
    return canvas


def render_heatmap(
    image: np.ndarray | Image.Image,
    anomaly_map: np.ndarray,
    vmin: float = 0.0,
    vmax: float = 1.0,
    threshold: float | None = None,
    alpha_range: tuple[float, float] = (0.25, 0.85),
    min_display_size: int = 256,
    lut: np.ndarray = INFERNO_LUT,
) -> Image.Image:
    """
    The anomaly map as a colour map blended over the image, with a colour bar and tick labels on the right.

    Args:
        image: the RGB image (H, W, 3) uint8 array or PIL image the map was computed for.
        anomaly_map: (H, W) scores, same size as `image`.
        vmin, vmax: scores mapped to the two ends of the colour map (clipped outside).
        threshold: decision threshold, marked on the colour bar when given.
        alpha_range: opacity of the colour at the lowest and highest scores: low scores let the scene show through,
            high ones cover it.
        min_display_size: small images are enlarged (nearest, integer factor k, `display_factor`) until their
            longer side reaches it and their height `MIN_PICTURE_HEIGHT`, so that a tiny image still gives a
            readable picture with the bar beside it; the .npy outputs keep the original size.
        lut: (N, 3) uint8 colour map, low to high.

    Returns:
        An RGB PIL image exactly H*k rows tall: the overlay (H*k, W*k) on the left, the colour-bar panel on the
        right, its labels `label_font_size(H*k)` pixels tall.
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    scores = np.asarray(anomaly_map)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"Expected an (H, W, 3) uint8 image; got shape {rgb.shape} and dtype {rgb.dtype}")
    if scores.shape != rgb.shape[:2]:
        raise ValueError(f"Expected an anomaly map of the image's size {rgb.shape[:2]}; got {scores.shape}")
    if not vmax > vmin:
        raise ValueError(f"Expected vmin < vmax; got vmin={vmin}, vmax={vmax}")
    height, width = scores.shape
    factor = display_factor(height, width, min_display_size)
    low_alpha, high_alpha = alpha_range
    alphas = np.linspace(low_alpha, high_alpha, len(lut), dtype=np.float32)[:, None]
    overlay = np.empty((height * factor, width * factor, 3), dtype=np.uint8)
    for y0 in range(0, height, _BLOCK_ROWS):
        y1 = min(height, y0 + _BLOCK_ROWS)
        index = _scale(scores[y0:y1], vmin, vmax)
        colour = lut[index].astype(np.float32)
        alpha = alphas[index]
        block = (1.0 - alpha) * rgb[y0:y1].astype(np.float32) + alpha * colour
        block = np.clip(np.round(block), 0, 255).astype(np.uint8)
        if factor > 1:
            block = block.repeat(factor, axis=0).repeat(factor, axis=1)
        overlay[y0 * factor:y1 * factor] = block
    return _beside(overlay, _colour_bar(overlay.shape[0], vmin, vmax, threshold, lut))


def palette_bytes(num_classes: int = len(CITYSCAPES_PALETTE)) -> list[int]:
    """A 256-entry PIL palette: the Cityscapes colours first, distinct generated colours for any further class
    ids, black for 255 (void)."""
    colours = list(CITYSCAPES_PALETTE)
    rng = np.random.default_rng(19)  # fixed seed: the same extra colours in every picture
    while len(colours) < 256:
        colours.append(tuple(int(v) for v in rng.integers(0, 256, size=3)))
    colours[255] = (0, 0, 0)
    if num_classes > 255:
        raise ValueError(f"A palette image holds at most 255 classes; got {num_classes}")
    return [channel for colour in colours for channel in colour]


def render_semantic(semantic_map: np.ndarray) -> Image.Image:
    """An (H, W) map of class ids as a palette ("P") PIL image with the Cityscapes colours."""
    labels = np.asarray(semantic_map)
    if labels.ndim != 2:
        raise ValueError(f"Expected an (H, W) semantic map; got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"Expected class ids in 0..255 for a palette image; got range [{labels.min()}, {labels.max()}]")
    picture = Image.fromarray(labels.astype(np.uint8))
    picture.putpalette(palette_bytes())  # an "L" image with a palette becomes "P"
    return picture


def _legend(height: int, entries: Sequence[tuple[tuple[int, int, int], str]]) -> Image.Image:
    """A white panel `height` tall listing (colour swatch, text) rows; rows that do not fit become "+N more"."""
    font_size = label_font_size(height)
    margin = max(4, font_size // 2)
    row_height = int(round(1.5 * font_size))
    capacity = max(1, (height - 2 * margin) // row_height)
    if len(entries) > capacity:
        hidden = len(entries) - (capacity - 1)
        entries = [*entries[:capacity - 1], ((255, 255, 255), f"+{hidden} more")]
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    swatch = font_size
    text_width = max((int(math.ceil(probe.textlength(text, font=font))) for _, text in entries), default=0)
    panel = Image.new("RGB", (margin + swatch + margin // 2 + text_width + margin, height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for row, (colour, text) in enumerate(entries):
        y = margin + row * row_height + row_height // 2
        draw.rectangle([margin, y - swatch // 2, margin + swatch - 1, y - swatch // 2 + swatch - 1], fill=colour,
                       outline=(0, 0, 0) if text[0] != "+" else (255, 255, 255))
        draw.text((margin + swatch + margin // 2, y), text, fill=(0, 0, 0), font=font, anchor="lm")
    return panel


def render_semantic_legend(
    semantic_map: np.ndarray,
    id2label: dict[int, str] | Sequence[str],
    min_display_size: int = 256,
) -> Image.Image:
    """
    The semantic map in the Cityscapes colours with a legend of the classes it shows, largest first.

    Args:
        semantic_map: (H, W) class ids (0..254; 255 = void).
        id2label: class names by id (a model config's `id2label`, or a sequence).
        min_display_size: as in `render_heatmap`: the same input size gives a picture of the same height.

    Returns:
        An RGB PIL image H*k rows tall (k = `display_factor`): the palette picture, then one legend row per class
        present (colour swatch, name, share of the pixels).
    """
    labels = np.asarray(semantic_map)
    picture = np.asarray(render_semantic(labels).convert("RGB"))
    factor = display_factor(*labels.shape, min_display_size)
    if factor > 1:
        picture = picture.repeat(factor, axis=0).repeat(factor, axis=1)
    names = dict(enumerate(id2label)) if not isinstance(id2label, dict) else {int(k): v for k, v in id2label.items()}
    palette = palette_bytes()
    ids, counts = np.unique(labels, return_counts=True)
    entries = []
    for index in np.argsort(-counts, kind="stable"):
        class_id = int(ids[index])
        colour = tuple(palette[3 * class_id:3 * class_id + 3])
        name = "void" if class_id == 255 else names.get(class_id, str(class_id))
        entries.append((colour, f"{name} {100 * counts[index] / labels.size:.0f}%"))
    return _beside(picture, _legend(picture.shape[0], entries))


__all__ = [
    "BOUNDED_SCORERS",
    "CITYSCAPES_PALETTE",
    "INFERNO_LUT",
    "anomaly_mask",
    "anomaly_summary",
    "colormap_lut",
    "default_score_range",
    "display_factor",
    "label_font_size",
    "palette_bytes",
    "render_heatmap",
    "render_semantic",
    "render_semantic_legend",
]
