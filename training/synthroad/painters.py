"""SynthRoad's drawing tools and painters: noise and colour helpers, the canvas (image + label), the pinhole
camera, and the painters of road-scene objects, anomalies and obstacles."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .labels import (
    BICYCLE,
    BUS,
    CAR,
    MOTORCYCLE,
    PERSON,
    POLE,
    RENDERED_ANOMALY,
    RIDER,
    TRAFFIC_LIGHT,
    TRAFFIC_SIGN,
    TRAIN,
    TRUCK,
    VEGETATION,
    VOID,
)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Value noise in [0, 1]: a random grid with one value every `cell` pixels, bilinearly upsampled.

    Returns float32 (height, width).
    """
    gh, gw = int(height / cell) + 2, int(width / cell) + 2
    grid = rng.random((gh, gw), dtype=np.float32)
    up = Image.fromarray(grid).resize((width, height), Image.BILINEAR)
    return np.asarray(up, dtype=np.float32)


def _fractal_noise(rng: np.random.Generator, height: int, width: int, base_cell: float = 32.0) -> np.ndarray:
    """Multi-octave value noise in about [0, 1], the look of natural surfaces (rock, bark). float32 (h, w)."""
    out = np.zeros((height, width), np.float32)
    amplitude, total, cell = 1.0, 0.0, base_cell
    while cell >= 1.5:
        out += amplitude * _smooth_noise(rng, height, width, cell)
        total += amplitude
        amplitude *= 0.55
        cell /= 2
    return out / total


def _hsv_to_rgb(h: np.ndarray | float, s: np.ndarray | float, v: np.ndarray | float) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]; returns float32 (..., 3)."""
    h, s, v = np.broadcast_arrays(np.asarray(h, np.float32), np.asarray(s, np.float32), np.asarray(v, np.float32))
    k = np.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], axis=-1)
    return (v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


Shape = tuple  # ("polygon", [(x, y), ...], fill) | ("ellipse", (x0, y0, x1, y1), fill) | ("rect", ..., fill)


def _raster(shapes: Sequence[Shape], height: int, width: int) -> tuple[np.ndarray, int, int] | None:
    """Rasterise shapes given in image coordinates into a local boolean mask clipped to the image.

    Later shapes overwrite earlier ones with their fill (1 adds, 0 cuts holes). Returns (mask (h, w) bool,
    left, top) or None when nothing lies inside the image.
    """
    xs: list[float] = []
    ys: list[float] = []
    for kind, coords, _ in shapes:
        if kind == "polygon":
            xs += [p[0] for p in coords]
            ys += [p[1] for p in coords]
        else:
            xs += [coords[0], coords[2]]
            ys += [coords[1], coords[3]]
    x0, y0 = max(int(np.floor(min(xs))) - 1, 0), max(int(np.floor(min(ys))) - 1, 0)
    x1, y1 = min(int(np.ceil(max(xs))) + 2, width), min(int(np.ceil(max(ys))) + 2, height)
    if x1 <= x0 or y1 <= y0:
        return None
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    for kind, coords, fill in shapes:
        if kind == "polygon":
            draw.polygon([(x - x0, y - y0) for x, y in coords], fill=fill)
        else:
            box = (coords[0] - x0, coords[1] - y0, coords[2] - x0, coords[3] - y0)
            if box[2] < box[0] or box[3] < box[1]:
                continue
            (draw.ellipse if kind == "ellipse" else draw.rectangle)(box, fill=fill)
    mask = np.asarray(canvas, dtype=bool)
    return (mask, x0, y0) if mask.any() else None


class _Canvas:
    """Image (float32 (H, W, 3) in [0, 1]) and label (uint8 (H, W)) painted back to front."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.height, self.width = height, width
        self.image = np.zeros((height, width, 3), np.float32)
        self.label = np.full((height, width), VOID, np.uint8)
        # Shared noise fields give every surface a texture without per-object noise generation.
        self.grain = rng.random((height, width), dtype=np.float32)
        self.blotch = _smooth_noise(rng, height, width, 12.0)

    def paint(self, shapes: Sequence[Shape], colour, label: int, texture: float = 0.08
              ) -> tuple[np.ndarray, int, int] | None:
        """Fill the shapes with `colour` and `label`; `colour` is (3,), or a function of the local mask's
        (height, width) returning float32 (height, width, 3) for textured surfaces.

        `texture` scales the shared grain/blotch noise. Returns the rasterised (mask, left, top), or None when
        the shapes lie outside the image.
        """
        raster = _raster(shapes, self.height, self.width)
        if raster is None:
            return None
        mask, x0, y0 = raster
        h, w = mask.shape
        window = (slice(y0, y0 + h), slice(x0, x0 + w))
        # Only the masked pixels are computed: most of a bounding box is usually outside the shape.
        shade = 1.0 + texture * (self.grain[window][mask] + 1.5 * self.blotch[window][mask] - 1.25)
        colour = np.asarray(colour(h, w) if callable(colour) else colour, np.float32)
        values = colour[mask] if colour.ndim == 3 else colour[None, :]
        self.image[window][mask] = values * shade[:, None]
        self.label[window][mask] = label
        return raster


@dataclass
class _Camera:
    """Pinhole camera `cam_height` metres above a flat ground; X right, Y up, Z forward (metres)."""

    horizon: float
    vanish_x: float
    focal: float
    cam_height: float

    def project(self, x: float, y: float, z: float) -> tuple[float, float]:
        return self.vanish_x + self.focal * x / z, self.horizon + self.focal * (self.cam_height - y) / z

    def scale(self, z: float) -> float:
        """Pixels per metre at depth z."""
        return self.focal / z


def _jitter(rng: np.random.Generator, rgb: Sequence[float], amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32), 0, 1)


_CAR_COLOURS = [(0.75, 0.75, 0.78), (0.1, 0.1, 0.12), (0.55, 0.05, 0.05), (0.1, 0.2, 0.5), (0.9, 0.9, 0.9),
                (0.4, 0.42, 0.45), (0.2, 0.35, 0.25), (0.8, 0.6, 0.1), (0.45, 0.3, 0.2)]
_SKIN = [(0.93, 0.76, 0.62), (0.78, 0.57, 0.42), (0.55, 0.37, 0.25), (0.35, 0.22, 0.15)]


# ------------------------------------------------------------------------------------------------ objects
def _box_vehicle(canvas: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float, kind: str,
                 oncoming: bool) -> None:
    """A vehicle seen from behind (or the front) as a box: side face towards the camera axis, then the end face."""
    dims = {"car": (1.8, 1.5, 4.3), "truck": (2.5, 3.4, 8.0), "bus": (2.55, 3.2, 12.0), "train": (2.6, 3.5, 25.0)}[kind]
    width, height, length = dims[0] * rng.uniform(0.92, 1.08), dims[1] * rng.uniform(0.92, 1.1), dims[2]
    label = {"car": CAR, "truck": TRUCK, "bus": BUS, "train": TRAIN}[kind]
    body = _jitter(rng, _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))] if kind in ("car", "truck") else
                   [(0.85, 0.75, 0.1), (0.2, 0.4, 0.7), (0.8, 0.15, 0.1), (0.9, 0.9, 0.9)][rng.integers(4)])
    p = cam.project
    half = width / 2
    # Soft shadow on the ground below the vehicle.
    sx0, sy = p(x - half * 1.15, 0, z)
    sx1, _ = p(x + half * 1.15, 0, z)
    _, sy_far = p(x, 0, z + length)
    shadow = _raster([("ellipse", (sx0, sy_far, sx1, sy + 0.15 * cam.scale(z)), 1)], canvas.height, canvas.width)
    if shadow is not None:
        mask, x0, y0 = shadow
        canvas.image[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] *= 0.45
    side_x = x - half if x > 0 else x + half
    wheel = np.array([0.06, 0.06, 0.07], np.float32)
    if abs(side_x) > 0.3:
        quad = [p(side_x, 0.3, z), p(side_x, height, z), p(side_x, height, z + length), p(side_x, 0.3, z + length)]
        canvas.paint([("polygon", quad, 1)], body * 0.8, label)
        band_lo, band_hi = (0.55, 0.85) if kind == "car" else (0.55, 0.8)
        if kind != "truck":
            y0w, y1w = height * band_lo + 0.2, height * band_hi
            canvas.paint([("polygon", [p(side_x, y0w, z + 0.5), p(side_x, y1w, z + 0.7),
                                       p(side_x, y1w, z + length - 0.7), p(side_x, y0w, z + length - 0.5)], 1)],
                         np.array([0.12, 0.15, 0.2], np.float32), label)
        for axle in (0.8, length - 1.0) if kind == "car" else (1.3, length - 2.0):
            cx, cy = p(side_x, 0.35, z + axle)
            r = 0.36 * cam.scale(z + axle)
            canvas.paint([("ellipse", (cx - r * 0.5, cy - r, cx + r * 0.5, cy + r), 1)], wheel, label)
    # End face.
    left_b, top_b = p(x - half, height, z)
    right_b, bottom_b = p(x + half, 0.25, z)
    if kind == "car":
        _, waist = p(x, 0.95, z)
        roof_l, roof_t = p(x - half * 0.8, height, z)
        roof_r, _ = p(x + half * 0.8, height, z)
        canvas.paint([("rect", (left_b, waist, right_b, bottom_b), 1),
                      ("polygon", [(left_b, waist), (roof_l, roof_t), (roof_r, roof_t), (right_b, waist)], 1)],
                     body, label)
        gl, gt = p(x - half * 0.7, height - 0.08, z)
        gr, gb = p(x + half * 0.82, 1.0, z)
        canvas.paint([("polygon", [(gl, gb), (gl + (gr - gl) * 0.06, gt), (gr - (gr - gl) * 0.06, gt), (gr, gb)], 1)],
                     np.array([0.15, 0.18, 0.22], np.float32), label)
    else:
        canvas.paint([("rect", (left_b, top_b, right_b, bottom_b), 1)], body, label)
        if kind in ("bus", "train"):
            gl, gt = p(x - half * 0.85, height - 0.3, z)
            gr, gb = p(x + half * 0.85, 1.6, z)
            canvas.paint([("rect", (gl, gt, gr, gb), 1)], np.array([0.12, 0.15, 0.2], np.float32), label)
        else:  # the cargo doors' seam and a bumper
            cx, _ = p(x, 0, z)
            canvas.paint([("rect", (cx - 0.5, top_b + 2, cx + 0.5, bottom_b - 2), 1)], body * 0.6, label)
    lamp = np.array([0.95, 0.95, 0.85] if oncoming else [0.85, 0.05, 0.05], np.float32)
    for sx in (-1, 1):
        lx, ly = p(x + sx * (half - 0.2), 0.75, z)
        r = 0.12 * cam.scale(z)
        canvas.paint([("rect", (lx - r, ly - r * 0.7, lx + r, ly + r * 0.7), 1)], lamp, label, texture=0.0)
        wx0, wy0 = p(x + sx * (half - 0.45), 0.35, z)
        wx1, wy1 = p(x + sx * (half - 0.05), 0.0, z)
        canvas.paint([("rect", (min(wx0, wx1), wy0, max(wx0, wx1), wy1), 1)], wheel, label)
    bx0, by0 = p(x - half, 0.45, z)
    bx1, by1 = p(x + half, 0.25, z)
    canvas.paint([("rect", (bx0, by0, bx1, by1), 1)], body * 0.5, label)


def _person(canvas: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float, base: float = 0.0,
            label: int = PERSON, seated: bool = False) -> None:
    """A pedestrian (or, seated, a rider's body) standing on height `base`; parts in world metres."""
    s = cam.scale(z)
    tall = rng.uniform(1.55, 1.9)
    cx, foot = cam.project(x, base, z)
    hip = foot - (0.25 if seated else 0.48) * tall * s
    shirt = _jitter(rng, [(0.7, 0.1, 0.1), (0.1, 0.2, 0.5), (0.9, 0.9, 0.88), (0.15, 0.15, 0.15), (0.3, 0.5, 0.3),
                          (0.85, 0.7, 0.2)][rng.integers(6)], 0.1)
    trousers = _jitter(rng, [(0.1, 0.12, 0.25), (0.2, 0.2, 0.2), (0.45, 0.38, 0.3)][rng.integers(3)])
    skin = _jitter(rng, _SKIN[rng.integers(len(_SKIN))], 0.03)
    hw = 0.2 * s
    stride = rng.uniform(0, 0.12) * s
    if not seated:
        canvas.paint([("polygon", [(cx - hw, hip), (cx - 0.02 * s, hip), (cx - stride, foot), (cx - stride - 0.1 * s, foot)], 1),
                      ("polygon", [(cx + 0.02 * s, hip), (cx + hw, hip), (cx + stride + 0.1 * s, foot), (cx + stride, foot)], 1)],
                     trousers, label)
    else:
        canvas.paint([("rect", (cx - hw, hip, cx + hw, hip + 0.35 * s), 1)], trousers, label)
    shoulder = hip - 0.32 * tall * s
    canvas.paint([("polygon", [(cx - hw * 1.1, shoulder), (cx + hw * 1.1, shoulder), (cx + hw, hip + 0.05 * s),
                               (cx - hw, hip + 0.05 * s)], 1),
                  ("rect", (cx - hw * 1.45, shoulder + 0.03 * s, cx - hw * 1.05, hip - 0.02 * s), 1),
                  ("rect", (cx + hw * 1.05, shoulder + 0.03 * s, cx + hw * 1.45, hip - 0.02 * s), 1)], shirt, label)
    head = 0.11 * s
    canvas.paint([("ellipse", (cx - head, shoulder - 2.3 * head, cx + head, shoulder - 0.1 * head), 1)], skin, label)
    hair = _jitter(rng, [(0.1, 0.07, 0.05), (0.35, 0.25, 0.12), (0.6, 0.5, 0.3), (0.5, 0.5, 0.5)][rng.integers(4)])
    canvas.paint([("ellipse", (cx - head * 1.05, shoulder - 2.4 * head, cx + head * 1.05, shoulder - 1.5 * head), 1)],
                 hair, label)


def _two_wheeler(canvas: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float, motor: bool) -> None:
    """A bicycle or motorcycle crossing the view (side view) with its rider."""
    s = cam.scale(z)
    label = MOTORCYCLE if motor else BICYCLE
    cx, ground = cam.project(x, 0, z)
    r = (0.32 if motor else 0.34) * s
    gap = (0.75 if motor else 0.55) * s
    dark = np.array([0.08, 0.08, 0.08], np.float32)
    thick = max(r * 0.18, 1.0)
    wheels = []
    for wx in (cx - gap, cx + gap):
        wheels += [("ellipse", (wx - r, ground - 2 * r, wx + r, ground), 1)]
        if not motor:
            wheels += [("ellipse", (wx - r + thick, ground - 2 * r + thick, wx + r - thick, ground - thick), 0)]
    canvas.paint(wheels, dark, label, texture=0.0)
    frame = _jitter(rng, [(0.7, 0.1, 0.1), (0.1, 0.3, 0.7), (0.2, 0.2, 0.2), (0.85, 0.85, 0.85)][rng.integers(4)])
    if motor:
        canvas.paint([("polygon", [(cx - gap * 0.8, ground - 1.6 * r), (cx + gap * 0.9, ground - 2.2 * r),
                                   (cx + gap * 0.7, ground - 1.2 * r), (cx - gap * 0.6, ground - 0.9 * r)], 1)],
                     frame, label)
    else:
        tw = max(0.04 * s, 1.0)
        hub_l, hub_r, seat = (cx - gap, ground - r), (cx + gap, ground - r), (cx - 0.1 * s, ground - 2.6 * r)
        bar = (cx + gap * 0.85, ground - 2.8 * r)
        tube = [("polygon", [(a[0], a[1] - tw), (b[0], b[1] - tw), (b[0], b[1] + tw), (a[0], a[1] + tw)], 1)
                for a, b in ((hub_l, seat), (seat, bar), (bar, hub_r), (seat, (cx, ground - r)), ((cx, ground - r), bar),
                             (hub_l, (cx, ground - r)))]
        canvas.paint(tube, frame, label, texture=0.0)
    _person(canvas, cam, rng, x - 0.1, z, base=(0.85 if motor else 0.9) - 0.35, label=RIDER, seated=True)


def _pole(canvas: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float) -> None:
    """A pole, possibly carrying a traffic sign or a traffic light (their own labels)."""
    height = rng.uniform(3.0, 7.0)
    s = cam.scale(z)
    px, ground = cam.project(x, 0, z)
    _, top = cam.project(x, height, z)
    half = max(0.07 * s, 0.6)
    grey = _jitter(rng, (0.45, 0.46, 0.48), 0.08)
    canvas.paint([("rect", (px - half, top, px + half, ground), 1)], grey, POLE)
    kind = rng.choice(["none", "sign", "light"], p=[0.35, 0.4, 0.25])
    if kind == "sign":
        sy = top + 0.45 * s
        size = rng.uniform(0.3, 0.45) * s
        shape = rng.integers(3)
        if shape == 0:  # prohibition: red ring on white
            canvas.paint([("ellipse", (px - size, sy - size, px + size, sy + size), 1)],
                         np.array([0.8, 0.1, 0.1], np.float32), TRAFFIC_SIGN, texture=0.02)
            canvas.paint([("ellipse", (px - size * 0.7, sy - size * 0.7, px + size * 0.7, sy + size * 0.7), 1)],
                         np.array([0.93, 0.93, 0.93], np.float32), TRAFFIC_SIGN, texture=0.02)
        elif shape == 1:  # warning triangle
            canvas.paint([("polygon", [(px, sy - size), (px + size, sy + size * 0.8), (px - size, sy + size * 0.8)], 1)],
                         np.array([0.85, 0.1, 0.1], np.float32), TRAFFIC_SIGN, texture=0.02)
            canvas.paint([("polygon", [(px, sy - size * 0.5), (px + size * 0.6, sy + size * 0.55),
                                       (px - size * 0.6, sy + size * 0.55)], 1)],
                         np.array([0.95, 0.9, 0.75], np.float32), TRAFFIC_SIGN, texture=0.02)
        else:  # blue information board
            canvas.paint([("rect", (px - size, sy - size * 0.8, px + size, sy + size * 0.8), 1)],
                         np.array([0.1, 0.3, 0.75], np.float32), TRAFFIC_SIGN, texture=0.02)
            canvas.paint([("rect", (px - size * 0.3, sy - size * 0.5, px + size * 0.3, sy + size * 0.5), 1)],
                         np.array([0.95, 0.95, 0.95], np.float32), TRAFFIC_SIGN, texture=0.02)
    elif kind == "light":
        bw, bh = 0.18 * s, 0.5 * s
        ly = top + bh + 0.05 * s
        canvas.paint([("rect", (px - bw, ly - bh, px + bw, ly + bh), 1)], np.array([0.12, 0.12, 0.1], np.float32),
                     TRAFFIC_LIGHT, texture=0.02)
        lit = rng.integers(3)
        for i, colour in enumerate([(0.95, 0.15, 0.1), (0.95, 0.7, 0.1), (0.2, 0.9, 0.3)]):
            cy = ly - bh + (2 * i + 1) * bh / 3
            lamp = np.asarray(colour, np.float32) * (1.0 if i == lit else 0.25)
            canvas.paint([("ellipse", (px - bw * 0.6, cy - bw * 0.6, px + bw * 0.6, cy + bw * 0.6), 1)], lamp,
                         TRAFFIC_LIGHT, texture=0.0)


def _tree(canvas: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float) -> None:
    """A tree (trunk and a crown of overlapping ellipses); Cityscapes labels both vegetation."""
    s = cam.scale(z)
    height = rng.uniform(4, 9)
    tx, ground = cam.project(x, 0, z)
    _, top = cam.project(x, height, z)
    trunk = max(0.15 * s, 0.7)
    canvas.paint([("rect", (tx - trunk, top + (ground - top) * 0.4, tx + trunk, ground), 1)],
                 _jitter(rng, (0.3, 0.22, 0.15)), VEGETATION)
    radius = rng.uniform(1.5, 3.0) * s
    blobs = []
    for _ in range(6):
        bx = tx + rng.uniform(-0.7, 0.7) * radius
        by = top + radius * 0.9 + rng.uniform(-0.5, 0.6) * radius
        br = radius * rng.uniform(0.45, 0.75)
        blobs.append(("ellipse", (bx - br, by - br, bx + br, by + br), 1))
    canvas.paint(blobs, _jitter(rng, (0.2, 0.38, 0.14), 0.07), VEGETATION, texture=0.5)


def _ego_hood(canvas: _Canvas, rng: np.random.Generator) -> None:
    """The ego vehicle's bonnet at the bottom of the image, void as in Cityscapes."""
    h, w = canvas.height, canvas.width
    rise = rng.uniform(0.06, 0.12) * h
    pts = [(0, h), (0, h - rise * 0.4)] + [
        (w * t, h - rise * (0.4 + 0.6 * np.sin(np.pi * t))) for t in np.linspace(0.05, 0.95, 12)] + [
        (w, h - rise * 0.4), (w, h)]
    canvas.paint([("polygon", pts, 1)], _jitter(rng, (0.12, 0.12, 0.14), 0.05), VOID, texture=0.3)



# ----------------------------------------------------------------------------- anomalies and obstacles
def _texture(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """Natural-looking surface textures of the test anomalies, float32 (h, w, 3).

    Deliberately not the flat/striped/checkered colours of the outlier-exposure objects.
    """
    if kind == "fur":
        base = _jitter(rng, [(0.45, 0.3, 0.18), (0.15, 0.12, 0.1), (0.85, 0.82, 0.75), (0.6, 0.45, 0.25)]
                       [rng.integers(4)], 0.05)
        fine = _fractal_noise(rng, h, w, 8.0)
        out = base * (0.75 + 0.5 * fine)[..., None]
        if rng.random() < 0.5:  # patches, as on cows or dalmatians
            spots = _smooth_noise(rng, h, w, rng.uniform(5, 12)) > 0.6
            out[spots] = _jitter(rng, [(0.08, 0.07, 0.06), (0.9, 0.88, 0.82)][rng.integers(2)]) * (
                0.8 + 0.3 * fine[spots])[:, None]
        return out
    if kind == "rock":
        base = _jitter(rng, [(0.5, 0.47, 0.43), (0.42, 0.36, 0.3), (0.6, 0.58, 0.55)][rng.integers(3)], 0.05)
        return base * (0.45 + 0.9 * _fractal_noise(rng, h, w, 24.0))[..., None]
    if kind == "wood":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        warp = _fractal_noise(rng, h, w, 16.0) * rng.uniform(6, 14)
        rings = 0.5 + 0.5 * np.sin(yy * rng.uniform(0.4, 0.9) + warp)
        return _jitter(rng, (0.5, 0.33, 0.18), 0.05) * (0.7 + 0.4 * rings)[..., None]
    raise ValueError(f"unknown texture {kind!r}")


def _paint_textured(canvas: _Canvas, rng: np.random.Generator, shapes: Sequence[Shape], kind: str
                    ) -> tuple[np.ndarray, int, int] | None:
    return canvas.paint(shapes, lambda h, w: _texture(rng, kind, h, w), RENDERED_ANOMALY, texture=0.0)


def _animal(canvas: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float, size: float) -> None:
    """A quadruped in side view: body, neck, head, ears, four legs, tail; fur texture."""
    s = cam.scale(z) * size
    cx, ground = cam.project(x, 0, z)
    facing = 1 if rng.random() < 0.5 else -1
    leg = rng.uniform(0.35, 0.6)
    body_l, body_h = rng.uniform(1.0, 1.6), rng.uniform(0.45, 0.7)
    top = ground - (leg + body_h) * s
    shapes = [("ellipse", (cx - body_l / 2 * s, top, cx + body_l / 2 * s, ground - leg * s + 0.1 * s), 1)]
    for lx in (-0.38, -0.25, 0.25, 0.38):
        lx_p = cx + lx * body_l * s
        shapes.append(("polygon", [(lx_p - 0.06 * s, ground - leg * s - 0.05 * s), (lx_p + 0.06 * s, ground - leg * s - 0.05 * s),
                                   (lx_p + 0.045 * s, ground), (lx_p - 0.045 * s, ground)], 1))
    nx = cx + facing * body_l * 0.42 * s
    neck_top = top - rng.uniform(0.15, 0.5) * s
    hx = nx + facing * 0.2 * s
    shapes.append(("polygon", [(nx - facing * 0.12 * s, top + 0.2 * s), (nx + facing * 0.1 * s, top + 0.25 * s),
                               (hx + facing * 0.05 * s, neck_top + 0.1 * s), (hx - facing * 0.12 * s, neck_top)], 1))
    head = rng.uniform(0.14, 0.22) * s
    shapes.append(("ellipse", (hx - head * (1.0 - facing * 0.4), neck_top - head * 0.7, hx + head * (1.0 + facing * 0.4),
                               neck_top + head * 0.9), 1))
    shapes.append(("polygon", [(hx - 0.05 * s, neck_top - head * 0.5), (hx - 0.12 * s, neck_top - head * 1.6),
                               (hx + 0.02 * s, neck_top - head * 0.6)], 1))
    tx = cx - facing * body_l * 0.5 * s
    shapes.append(("polygon", [(tx, top + 0.12 * s), (tx - facing * 0.08 * s, top + 0.1 * s),
                               (tx - facing * 0.14 * s, ground - leg * s * 0.8), (tx - facing * 0.09 * s, ground - leg * s * 0.8)], 1))
    _paint_textured(canvas, rng, shapes, "fur")


def _blob_outline(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, flat_bottom: bool,
                  roughness: float = 0.15) -> list[tuple[float, float]]:
    """A rounded irregular outline (boulder/stone), optionally resting on a flat base."""
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = 1 + sum(rng.uniform(-roughness, roughness) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                for k in range(2, 7))
    xs, ys = cx + rx * r * np.cos(theta), cy + ry * r * np.sin(theta)
    if flat_bottom:
        ys = np.minimum(ys, cy + ry * 0.6)
    return list(zip(xs.tolist(), ys.tolist()))


def _rock(canvas: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float, size: float) -> None:
    s = cam.scale(z) * size
    cx, ground = cam.project(x, 0, z)
    rx, ry = rng.uniform(0.5, 0.8) * s, rng.uniform(0.3, 0.5) * s
    _paint_textured(canvas, rng, [("polygon", _blob_outline(rng, cx, ground - ry * 0.6, rx, ry, True), 1)], "rock")


def _log(canvas: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float, size: float) -> None:
    """A lying tree trunk: a long slanted bar with a round cut end."""
    s = cam.scale(z) * size
    cx, ground = cam.project(x, 0, z)
    length, radius = rng.uniform(1.2, 2.0) * s, rng.uniform(0.12, 0.22) * s
    slope = rng.uniform(-0.2, 0.2) * length
    body = [(cx - length / 2, ground - 2 * radius - slope / 2), (cx + length / 2, ground - 2 * radius + slope / 2),
            (cx + length / 2, ground + slope / 2), (cx - length / 2, ground - slope / 2)]
    end_x, end_y = cx + length / 2, ground - radius + slope / 2
    _paint_textured(canvas, rng, [("polygon", body, 1),
                                  ("ellipse", (end_x - radius * 0.6, end_y - radius, end_x + radius * 0.6, end_y + radius), 1)],
                    "wood")


def _cone(canvas: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float, size: float) -> None:
    s = cam.scale(z) * size
    cx, ground = cam.project(x, 0, z)
    height = rng.uniform(0.5, 0.8) * s
    base = 0.2 * s
    orange = _jitter(rng, (0.95, 0.4, 0.05), 0.04)
    canvas.paint([("rect", (cx - base * 1.4, ground - 0.05 * s, cx + base * 1.4, ground), 1),
                  ("polygon", [(cx - base, ground - 0.05 * s), (cx - 0.03 * s, ground - height),
                               (cx + 0.03 * s, ground - height), (cx + base, ground - 0.05 * s)], 1)], orange, RENDERED_ANOMALY)
    for frac in (0.35, 0.6):  # reflective white bands
        y0, y1 = ground - height * (frac + 0.1), ground - height * frac
        half0, half1 = base * (1 - frac - 0.1) + 0.03 * s, base * (1 - frac) + 0.03 * s
        canvas.paint([("polygon", [(cx - half1, y1), (cx - half0, y0), (cx + half0, y0), (cx + half1, y1)], 1)],
                     np.array([0.95, 0.95, 0.95], np.float32), RENDERED_ANOMALY, texture=0.03)


def _cardboard_box(canvas: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float, size: float) -> None:
    """A cuboid box: front, top and side faces in shaded cardboard with a tape strip."""
    w, h, d = (rng.uniform(0.3, 0.7) * size for _ in range(3))
    p = cam.project
    tan = _jitter(rng, (0.72, 0.55, 0.35), 0.05)
    side_x = x + w / 2 if x < 0 else x - w / 2
    canvas.paint([("polygon", [p(side_x, 0, z), p(side_x, h, z), p(side_x, h, z + d), p(side_x, 0, z + d)], 1)],
                 tan * 0.7, RENDERED_ANOMALY)
    canvas.paint([("polygon", [p(x - w / 2, h, z), p(x + w / 2, h, z), p(x + w / 2, h, z + d), p(x - w / 2, h, z + d)], 1)],
                 tan * 1.15, RENDERED_ANOMALY)
    front = [p(x - w / 2, 0, z), p(x - w / 2, h, z), p(x + w / 2, h, z), p(x + w / 2, 0, z)]
    canvas.paint([("polygon", front, 1)], tan, RENDERED_ANOMALY)
    tx0, ty0 = p(x - 0.04, h, z)
    tx1, ty1 = p(x + 0.04, 0, z)
    canvas.paint([("rect", (tx0, ty0, tx1, ty1), 1)], np.array([0.8, 0.75, 0.6], np.float32), RENDERED_ANOMALY)


def _tyre(canvas: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float, size: float) -> None:
    """A tyre standing upright (ring seen at an angle) or lying flat (flattened ring)."""
    s = cam.scale(z) * size
    cx, ground = cam.project(x, 0, z)
    r = rng.uniform(0.3, 0.4) * s
    squash = rng.uniform(0.45, 0.9) if rng.random() < 0.6 else rng.uniform(0.15, 0.3)
    cy = ground - r if squash > 0.4 else ground - r * squash
    rx, ry = (r * squash, r) if squash > 0.4 else (r, r * squash)
    inner = 0.55
    rubber = np.array([0.07, 0.07, 0.08], np.float32) * rng.uniform(0.8, 1.5)
    canvas.paint([("ellipse", (cx - rx, cy - ry, cx + rx, cy + ry), 1),
                  ("ellipse", (cx - rx * inner, cy - ry * inner, cx + rx * inner, cy + ry * inner), 0)], rubber,
                 RENDERED_ANOMALY, texture=0.4)


_ANOMALY_PAINTERS: dict[str, Callable[..., None]] = {"animal": _animal, "rock": _rock, "log": _log}
_OBSTACLE_PAINTERS: dict[str, Callable[..., None]] = {
    "cone": _cone, "box": _cardboard_box, "tyre": _tyre, "rock": _rock, "animal": _animal}
