"""Heatmap and legend pictures at any input size (issue 16.15): pixel geometry checked on the PNG's pixels
(no white band under the picture, the bar beside it, labels tall enough to read), from 64x128 to 4096x2048."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from modeling_mask2anomaly import CITYSCAPES_CLASSES
from modeling_mask2anomaly.visualize import CITYSCAPES_PALETTE, INFERNO_LUT, render_heatmap, render_semantic_legend

SIZES = [(64, 128), (40, 56), (128, 256), (100, 300), (512, 128), (1024, 2048), (2048, 4096)]  # (height, width)
GREY = 100


def _dark_runs(mask_rows: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of the runs of True in a 1-D array."""
    runs, start = [], None
    for y, value in enumerate(list(mask_rows) + [False]):
        if value and start is None:
            start = y
        elif not value and start is not None:
            runs.append((start, y - start))
            start = None
    return runs


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_heatmap_geometry_and_legible_labels(size, tmp_path):
    height, width = size
    image = np.full((height, width, 3), GREY, np.uint8)
    path = tmp_path / "heatmap.png"
    render_heatmap(image, np.full((height, width), 0.5, np.float32), 0.0, 1.0, threshold=0.25).save(path)
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)

    # the picture is the image enlarged by an integer factor: as tall as the canvas (no band under it), its longer
    # side at least 256 and its height at least 160 rows so that the bar fits beside it
    factor = picture.shape[0] // height
    assert picture.shape[0] == factor * height and factor >= 1
    assert max(height, width) * factor >= 256 and picture.shape[0] >= 160
    assert factor == 1 or (max(height, width) * (factor - 1) < 256 or height * (factor - 1) < 160)
    # every overlay pixel, bottom rows included, is the blend of grey with the colour of 0.5 at its opacity
    alpha = np.linspace(0.25, 0.85, 256)[128]
    blend = np.round((1 - alpha) * GREY + alpha * INFERNO_LUT[128]).astype(int)
    overlay = picture[:, :width * factor]
    assert np.abs(overlay - blend).max() <= 1, "the overlay fills the whole height of the canvas"

    # the panel to the right: a bar of the colour map, then black tick labels
    panel = picture[:, width * factor:]
    assert 0 < panel.shape[1] <= max(0.6 * overlay.shape[1], 120)
    near_top = np.abs(panel - INFERNO_LUT[-1]).sum(axis=2) <= 6
    near_bottom = np.abs(panel - INFERNO_LUT[0]).sum(axis=2) <= 6
    assert np.nonzero(near_top)[0].mean() < np.nonzero(near_bottom)[0].mean(), "high scores at the top of the bar"
    bar_end = np.nonzero(near_top.any(axis=0))[0].max()  # pale yellow: only the bar has it
    assert bar_end < 0.4 * panel.shape[1], "the labels take the right part of the panel"
    labels = panel[:, round(0.6 * panel.shape[1]):round(0.85 * panel.shape[1])]  # inside every label, right of ticks
    runs = _dark_runs((labels.sum(axis=2) < 200).any(axis=1))
    assert len(runs) == 5, runs
    expected_font = max(14, round(picture.shape[0] / 24))
    for _, glyph_height in runs:  # digits are about 0.7 of the font size
        assert glyph_height >= 0.6 * expected_font and glyph_height >= 9, (glyph_height, expected_font)
    # the cyan threshold mark at a quarter of the bar's height from the bottom
    cyan = np.nonzero(((panel[..., 0] < 40) & (panel[..., 1] > 215) & (panel[..., 2] > 215)).any(axis=1))[0]
    bar_rows = np.nonzero(near_top.any(axis=1) | near_bottom.any(axis=1))[0]
    top, bottom = bar_rows.min(), bar_rows.max()
    assert abs(cyan.mean() - (bottom - 0.25 * (bottom - top))) <= 0.02 * (bottom - top) + 2


def test_large_heatmap_labels_stay_readable_when_shown_at_screen_size():
    """A 4096x2048 heatmap shrunk to 1024 pixels wide (a screen) still has labels at least 12 pixels tall."""
    picture = render_heatmap(np.full((2048, 4096, 3), GREY, np.uint8), np.zeros((2048, 4096), np.float32))
    scale = 1024 / picture.width
    shrunk = np.asarray(picture.resize((1024, round(picture.height * scale)), Image.Resampling.BOX)).astype(int)
    panel = shrunk[:, round(4096 * scale) + 1:]
    labels = panel[:, round(0.6 * panel.shape[1]):round(0.85 * panel.shape[1])]
    runs = _dark_runs((labels.sum(axis=2) < 300).any(axis=1))
    assert len(runs) == 5 and min(length for _, length in runs) >= 12, runs


@pytest.mark.parametrize("size", [(64, 128), (128, 256), (2048, 4096)], ids=["64x128", "128x256", "2048x4096"])
def test_semantic_legend_beside_the_map_lists_the_classes_largest_first(size):
    height, width = size
    labels = np.zeros((height, width), np.uint8)  # road
    labels[: height // 2] = 10  # sky, half
    labels[height // 2:, : width // 4] = 13  # car, an eighth
    heatmap = render_heatmap(np.zeros((height, width, 3), np.uint8), np.zeros((height, width), np.float32))
    legend = np.asarray(render_semantic_legend(labels, CITYSCAPES_CLASSES)).astype(int)
    assert legend.shape[0] == heatmap.height, "the two pictures of one image have the same height"
    factor = legend.shape[0] // height
    assert np.array_equal(legend[:, :width * factor][::factor, ::factor],
                          np.array([[CITYSCAPES_PALETTE[v] for v in row] for row in labels]))
    panel = legend[:, width * factor:]
    # one swatch per class, from the top: sky (50%), road (37.5%), car (12.5%)
    rows = []
    for colour in (CITYSCAPES_PALETTE[10], CITYSCAPES_PALETTE[0], CITYSCAPES_PALETTE[13]):
        hits = np.nonzero((np.abs(panel - colour).sum(axis=2) == 0).any(axis=1))[0]
        assert hits.size >= 10, colour
        rows.append(hits.mean())
    assert rows == sorted(rows)
    assert (panel.sum(axis=2) < 100).sum() > 50, "class names drawn beside the swatches"


def test_a_legend_with_more_classes_than_rows_ends_with_a_count():
    labels = np.arange(19, dtype=np.uint8).repeat(2)[None].repeat(8, axis=0)  # 19 classes on an 8 x 38 map
    legend = render_semantic_legend(labels, CITYSCAPES_CLASSES)
    assert legend.height == 128  # enlarged 16x: 14-pixel labels in rows of 21 between margins of 7
    panel = np.asarray(legend).astype(int)[:, 38 * 16:]
    swatches = [c for c in CITYSCAPES_PALETTE if (np.abs(panel - c).sum(axis=2) == 0).sum() >= 20]
    rows_available = math.floor((legend.height - 2 * 7) / 21)
    assert len(swatches) == rows_available - 1 < 19  # the last row says how many more
