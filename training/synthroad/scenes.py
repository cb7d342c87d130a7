"""SynthRoad's scenes: the background layout, whole road scenes per split, the outlier-exposure images, and
the items of a split as a pure function of (seed, split, index)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .labels import (
    _SPLIT_CODES,
    BUILDING,
    FENCE,
    MIN_SIZE,
    RENDERED_ANOMALY,
    ROAD,
    SIDEWALK,
    SKY,
    SPLITS,
    TERRAIN,
    VEGETATION,
    VOID,
    WALL,
)
from .painters import (
    _ANOMALY_PAINTERS,
    _OBSTACLE_PAINTERS,
    _box_vehicle,
    _Camera,
    _Canvas,
    _ego_hood,
    _hsv_to_rgb,
    _jitter,
    _person,
    _pole,
    _raster,
    _smooth_noise,
    _tree,
    _two_wheeler,
)


# ----------------------------------------------------------------------------------------------- helpers
def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of one item: a function of (seed, split, index) only."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index)])



# ----------------------------------------------------------------------------------------- the background
@dataclass
class _Layout:
    road_left: float  # metres from the camera axis to the left road edge
    road_right: float
    walk_left: float  # sidewalk widths
    walk_right: float
    strip_left: float  # terrain strip between sidewalk and facade
    strip_right: float
    lane_width: float

    @property
    def facade_left(self) -> float:
        return self.road_left + self.walk_left + self.strip_left

    @property
    def facade_right(self) -> float:
        return self.road_right + self.walk_right + self.strip_right


def _facade_segments(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Blocks along one side of the street: start depth, kind, height, colour, window pattern."""
    starts, kinds, heights = [], [], []
    z = rng.uniform(-5, 2)
    while z < 400:
        starts.append(z)
        kind = rng.choice(["building", "wall", "fence", "vegetation", "gap"], p=[0.55, 0.1, 0.1, 0.15, 0.1])
        kinds.append(kind)
        heights.append({"building": rng.uniform(7, 28), "wall": rng.uniform(1.0, 2.5), "fence": rng.uniform(1.2, 2.2),
                        "vegetation": rng.uniform(2.5, 9), "gap": 0.0}[kind])
        z += rng.uniform(8, 35) if kind == "building" else rng.uniform(5, 20)
    n = len(starts)
    palette = np.array([(0.62, 0.55, 0.48), (0.7, 0.68, 0.62), (0.45, 0.38, 0.34), (0.78, 0.74, 0.66),
                        (0.55, 0.56, 0.6), (0.72, 0.5, 0.38), (0.85, 0.82, 0.72)], np.float32)
    colours = palette[rng.integers(len(palette), size=n)] + rng.uniform(-0.06, 0.06, (n, 3)).astype(np.float32)
    return {
        "start": np.asarray(starts, np.float32),
        "kind": np.asarray(kinds),
        "height": np.asarray(heights, np.float32),
        "colour": np.clip(colours, 0, 1),
        "window_w": rng.uniform(2.5, 4.5, n).astype(np.float32),
        "window_h": rng.uniform(2.8, 3.6, n).astype(np.float32),
        "window_duty": rng.uniform(0.35, 0.65, n).astype(np.float32),
    }


def _render_background(rng: np.random.Generator, canvas: _Canvas, cam: _Camera, layout: _Layout) -> None:
    """Sky, ground (road, markings, sidewalks, terrain) and both facades.

    Speed comes from separability: a ground pixel's depth depends only on its row and a facade pixel's depth
    only on its column, so per-pixel work is a few comparisons; colours come from one palette lookup at the end.
    """
    h, w = canvas.height, canvas.width
    ys = np.arange(h, dtype=np.float32) + 0.5
    xs = np.arange(w, dtype=np.float32) + 0.5
    palette: list[np.ndarray] = []
    roughness: list[float] = []  # how strongly the shared noise textures each material

    def material(rgb, rough: float = 0.15) -> int:
        palette.append(np.asarray(rgb, np.float32))
        roughness.append(rough)
        return len(palette) - 1

    sky_material = material((0, 0, 0), 0.0)  # replaced by the sky gradient below
    asphalt = rng.uniform(0.28, 0.45)
    road_material = material((asphalt, asphalt, asphalt * 1.04), 0.25)
    mark_material = material((0.88, 0.88, 0.84), 0.1)
    walk_material = material(_jitter(rng, [(0.62, 0.6, 0.57), (0.7, 0.62, 0.55), (0.55, 0.56, 0.58)][rng.integers(3)]))
    strip_material = material(_jitter(rng, [(0.35, 0.5, 0.2), (0.5, 0.45, 0.3)][int(rng.random() < 0.3)]), 0.5)
    glass_material = material((0.25, 0.3, 0.36), 0.6)
    vegetation_material = material((0.2, 0.36, 0.13), 1.2)
    mat = np.full((h, w), sky_material, np.int32)
    shade = np.ones((h, w), np.float32)
    label = canvas.label
    label[:] = SKY

    # Ground: rows below the horizon; depth per row, lateral position per pixel.
    r0 = int(min(max(np.ceil(cam.horizon), 0), h))
    ground = (slice(r0, h), slice(None))
    z_row = cam.focal * cam.cam_height / np.maximum(ys[r0:] - cam.horizon, 0.5)  # (Hg,)
    x_ground = (xs - cam.vanish_x)[None, :] * (z_row[:, None] / cam.focal)  # (Hg, W)
    road = (x_ground >= -layout.road_left) & (x_ground <= layout.road_right)
    walk = ~road & (x_ground >= -layout.road_left - layout.walk_left) & (x_ground <= layout.road_right + layout.walk_right)
    mat[ground] = np.where(road, road_material, np.where(walk, walk_material, strip_material))
    label[ground] = np.where(road, ROAD, np.where(walk, SIDEWALK, TERRAIN))
    # Lane markings: solid edge lines, dashed lane separators, sometimes a crosswalk.
    line_half = 0.075
    marks = np.zeros_like(road)
    for edge in (-layout.road_left + 0.3, layout.road_right - 0.3):
        marks |= np.abs(x_ground - edge) < line_half
    n_lanes = max(int((layout.road_left + layout.road_right) // layout.lane_width), 1)
    dash = rng.uniform(6, 12)
    dashed = (np.mod(z_row, dash) < dash * 0.45)[:, None]
    for k in range(1, n_lanes):
        x_line = -layout.road_left + k * (layout.road_left + layout.road_right) / n_lanes
        marks |= (np.abs(x_ground - x_line) < line_half) & dashed
    if rng.random() < 0.35:
        z0 = rng.uniform(8, 30)
        marks |= ((z_row > z0) & (z_row < z0 + 3.5))[:, None] & (np.mod(x_ground, 1.0) < 0.5)
    mat[ground][marks & road] = mark_material
    tile = rng.uniform(0.4, 0.8)
    joints = (np.mod(x_ground, tile) < 0.04) | (np.mod(z_row, tile) < 0.04)[:, None]
    shade[ground][walk & joints] = 0.8

    # Facades: column x sees the plane X = -/+ distance at depth Z = f * distance / |x - vx|, whatever its row.
    sun_left = rng.random() < 0.5
    shadow_tan = rng.uniform(0.3, 1.2)
    kind_labels = {"building": BUILDING, "wall": WALL, "fence": FENCE, "vegetation": VEGETATION, "gap": VOID}
    split_col = int(np.clip(np.round(cam.vanish_x), 0, w))
    for side, sign, dist, cols in (("left", -1.0, layout.facade_left, slice(0, split_col)),
                                   ("right", 1.0, layout.facade_right, slice(split_col, w))):
        seg = _facade_segments(rng)
        n = len(seg["start"])
        offset = len(palette)
        for colour in seg["colour"]:
            material(colour, 0.2)
        dx = np.maximum(sign * (xs[cols] - cam.vanish_x), 0.5)
        z_col = cam.focal * dist / dx  # (Wc,)
        idx = np.clip(np.searchsorted(seg["start"], z_col, side="right") - 1, 0, n - 1)
        kind = seg["kind"][idx]
        top = seg["height"][idx]
        y_f = cam.cam_height - (ys[:, None] - cam.horizon) * (z_col / cam.focal)[None, :]  # (H, Wc)
        is_veg = kind == "vegetation"
        wobble = np.where(is_veg[None, :], 1.2 * (canvas.blotch[:, cols] - 0.5), 0.0)
        hit = (y_f >= 0) & (y_f <= top[None, :] + wobble) & (z_col < 400)[None, :]
        col_label = np.array([kind_labels[k] for k in kind], np.uint8)
        col_material = np.where(is_veg, vegetation_material, offset + idx)
        mat[:, cols] = np.where(hit, col_material[None, :], mat[:, cols])
        label[:, cols] = np.where(hit, col_label[None, :], label[:, cols])
        # Windows on buildings: a grid in facade coordinates (depth along the street, height).
        u = np.mod(z_col / seg["window_w"][idx], 1.0) < seg["window_duty"][idx]
        v = np.mod(y_f / seg["window_h"][idx][None, :], 1.0)
        windows = hit & ((kind == "building") & u)[None, :] & (v > 0.3) & (v < 0.8) & (y_f > 3.0) & (
            y_f < top[None, :] - 1.0)
        mat[:, cols][windows] = glass_material
        fence_slats = np.where((kind == "fence") & (np.mod(z_col * 4.0, 1.0) < 0.5), 0.6,
                               np.where(kind == "wall", 0.85, 1.0))
        shade[:, cols] *= np.where(hit, fence_slats[None, :], 1.0)
        # The facade facing away from the sun is darker; the ground beside tall blocks on the sun side lies
        # in their cast shadow.
        if (side == "left") != sun_left:
            shade[:, cols] *= np.where(hit, 0.75, 1.0)
        else:
            row_idx = np.clip(np.searchsorted(seg["start"], z_row, side="right") - 1, 0, n - 1)
            reach = seg["height"][row_idx] * shadow_tan  # (Hg,)
            shadow = (sign * x_ground > (dist - reach)[:, None]) & (label[ground] != SKY)
            shadow[:, cols] &= ~hit[r0:]
            shade[ground] *= np.where(shadow, 0.6, 1.0)

    colours = np.stack(palette)
    texture = np.asarray(roughness, np.float32)[mat] * (canvas.grain + 1.5 * canvas.blotch - 1.25)
    canvas.image[:] = colours[mat] * (shade * (1.0 + texture))[..., None]
    # Sky, only above the horizon: vertical gradient with clouds from smooth noise; overcast skies are grey.
    overcast = rng.random() < 0.35
    sky_top = np.array([0.62, 0.64, 0.68] if overcast else [0.30, 0.50, 0.85], np.float32)
    sky_low = np.array([0.80, 0.81, 0.83] if overcast else [0.72, 0.82, 0.95], np.float32)
    if r0 > 0:
        t = np.clip(ys[:r0] / max(cam.horizon, 1.0), 0, 1)[:, None, None]
        clouds = np.clip((_smooth_noise(rng, r0, w, 40.0) - 0.45) * 2.5, 0, 1)[..., None] * rng.uniform(0.2, 0.7)
        sky = (sky_top * (1 - t) + sky_low * t) * (1 - clouds) + 0.95 * clouds
        is_sky = label[:r0] == SKY
        canvas.image[:r0][is_sky] = sky[is_sky]



# ------------------------------------------------------------------------------------------- the scenes
def render_scene(rng: np.random.Generator, height: int, width: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Render one road scene of a road split ("train", "val", "anomaly" or "obstacle").

    Returns image uint8 (height, width, 3) RGB and label uint8 (height, width): train ids for train/val,
    0/1/255 for anomaly/obstacle (see the module docstring).
    """
    if split not in ("train", "val", "anomaly", "obstacle"):
        raise ValueError(f"render_scene renders road splits (train, val, anomaly, obstacle), not {split!r}")
    canvas = _Canvas(rng, height, width)
    cam = _Camera(horizon=height * rng.uniform(0.36, 0.5), vanish_x=width * rng.uniform(0.42, 0.58),
                  focal=width * rng.uniform(0.7, 0.95), cam_height=rng.uniform(1.3, 1.7))
    layout = _Layout(road_left=rng.uniform(3, 9), road_right=rng.uniform(3, 9), walk_left=rng.uniform(1.5, 4),
                     walk_right=rng.uniform(1.5, 4), strip_left=rng.uniform(0, 5) * (rng.random() < 0.5),
                     strip_right=rng.uniform(0, 5) * (rng.random() < 0.5), lane_width=rng.uniform(3.0, 3.6))
    _render_background(rng, canvas, cam, layout)

    # Everything standing on the ground, drawn far to near (painter's algorithm).
    things: list[tuple[float, Callable[[], None]]] = []

    def add(z: float, fn: Callable, *args) -> None:
        things.append((z, lambda: fn(canvas, cam, rng, *args)))

    traffic = 0.4 if split == "obstacle" else 1.0
    # RoadAnomaly21 anomalies are prominent: keep road users behind them rather than in front.
    near = 18.0 if split == "anomaly" else 0.0
    for _ in range(rng.poisson(4 * traffic)):
        x = rng.uniform(-layout.road_left + 1.2, layout.road_right - 1.2)
        z = rng.uniform(max(7, near), 80)
        kind = rng.choice(["car", "truck", "bus", "train"], p=[0.73, 0.15, 0.09, 0.03])  # "train": a tram
        add(z, _box_vehicle, x, z, kind, bool(x < 0 and rng.random() < 0.6))
    for side, x_edge in ((-1, layout.road_left), (1, layout.road_right)):
        for _ in range(rng.poisson(1.5 * traffic)):  # parked at the kerb
            z = rng.uniform(max(6, near), 60)
            add(z, _box_vehicle, side * (x_edge - 1.1), z, "car", False)
    for _ in range(rng.poisson(3)):
        side = rng.choice([-1, 1])
        lo, walk = (layout.road_left, layout.walk_left) if side < 0 else (layout.road_right, layout.walk_right)
        x = side * (lo + rng.uniform(0.4, walk - 0.3))
        if rng.random() < 0.15:  # crossing the road
            x = rng.uniform(-layout.road_left, layout.road_right)
        z = rng.uniform(max(4, near), 50)
        add(z, _person, x, z)
    for _ in range(rng.poisson(0.8 * traffic)):
        x = rng.uniform(-layout.road_left + 1, layout.road_right - 1)
        z = rng.uniform(max(6, near), 40)
        add(z, _two_wheeler, x, z, bool(rng.random() < 0.4))
    for side, x_edge in ((-1, layout.road_left), (1, layout.road_right)):
        z = rng.uniform(3, 15)
        while z < 120:
            add(z, _pole, side * (x_edge + 0.4), z)
            z += rng.uniform(12, 35)
        strip = layout.strip_left if side < 0 else layout.strip_right
        walk = layout.walk_left if side < 0 else layout.walk_right
        if strip > 1.0 or rng.random() < 0.5:
            z = rng.uniform(4, 20)
            x_tree = x_edge + walk + strip / 2 if strip > 1.0 else x_edge + walk - 0.6
            while z < 120:
                add(z, _tree, side * x_tree, z)
                z += rng.uniform(8, 25)

    if split == "anomaly":
        for _ in range(rng.integers(1, 4)):
            kind = rng.choice(list(_ANOMALY_PAINTERS), p=[0.5, 0.3, 0.2])
            z = rng.uniform(5, 22)
            x = rng.uniform(-layout.road_left - layout.walk_left, layout.road_right + layout.walk_right)
            add(z - 0.01, _ANOMALY_PAINTERS[kind], x, z, rng.uniform(1.2, 2.5))
    elif split == "obstacle":
        for _ in range(rng.integers(1, 5)):
            kind = rng.choice(list(_OBSTACLE_PAINTERS), p=[0.3, 0.25, 0.2, 0.15, 0.1])
            z = rng.uniform(4, 35)
            x = rng.uniform(-layout.road_left + 0.5, layout.road_right - 0.5)
            size = 0.5 if kind == "animal" else rng.uniform(0.7, 1.3)
            add(z - 0.01, _OBSTACLE_PAINTERS[kind], x, z, size)

    for _, draw in sorted(things, key=lambda t: -t[0]):
        draw()
    if rng.random() < 0.5:
        _ego_hood(canvas, rng)

    # Global lighting: brightness, colour cast and sensor noise.
    gain = (rng.uniform(0.7, 1.2) * (1 + rng.uniform(-0.08, 0.08, 3)) * 255).astype(np.float32)
    image = canvas.image
    image *= gain
    image += canvas.grain[..., None] * 10.0 - 4.5  # sensor noise, +0.5 rounds the conversion below
    np.clip(image, 0, 255, out=image)
    image = image.astype(np.uint8)
    return image, _split_label(canvas.label, split)


def _split_label(label: np.ndarray, split: str) -> np.ndarray:
    """Turn the rendered label (train ids, 254 anomaly, 255 void) into the split's label convention."""
    if split in ("train", "val"):
        return label
    anomaly = label == RENDERED_ANOMALY
    if split == "anomaly":
        out = np.where(anomaly, 1, 0).astype(np.uint8)
        # Void a one-pixel ring around each anomaly, as RoadAnomaly21 leaves object borders unlabelled.
        grown = anomaly.copy()
        grown[1:] |= anomaly[:-1]
        grown[:-1] |= anomaly[1:]
        grown[:, 1:] |= anomaly[:, :-1]
        grown[:, :-1] |= anomaly[:, 1:]
        out[grown & ~anomaly] = VOID
        out[label == VOID] = VOID
        return out
    out = np.full(label.shape, VOID, np.uint8)
    out[label == ROAD] = 0
    out[anomaly] = 1
    return out


def render_outliers(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An outlier-exposure item: 1-3 random polygons/blobs with synthetic textures on a random background.

    Returns image uint8 (height, width, 3) and mask uint8 (height, width) with 1 on object pixels, 0 elsewhere.
    """
    bg = _hsv_to_rgb(rng.random(), rng.uniform(0, 0.4), rng.uniform(0.2, 0.8))
    image = bg * (0.8 + 0.4 * _smooth_noise(rng, height, width, 32.0))[..., None]
    mask = np.zeros((height, width), bool)
    wanted = rng.integers(1, 4)
    # Keep adding shapes until `wanted` are drawn and they cover at least 1% (thin slivers are useless).
    for attempt in range(8):
        if attempt >= wanted and mask.mean() >= 0.01:
            break
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        radius = rng.uniform(0.12, 0.35) * min(height, width)
        n = rng.integers(3, 10) if rng.random() < 0.5 else 40
        theta = np.sort(rng.uniform(0, 2 * np.pi, n)) if n < 40 else np.linspace(0, 2 * np.pi, n, endpoint=False)
        if n < 40:  # star-shaped random polygon
            r = radius * rng.uniform(0.5, 1.0, n)
        else:  # Fourier blob
            r = radius * (1 + sum(rng.uniform(-0.35, 0.35) * np.cos(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5)))
        pts = list(zip((cx + r * np.cos(theta)).tolist(), (cy + r * np.sin(theta) * rng.uniform(0.5, 1.5)).tolist()))
        raster = _raster([("polygon", pts, 1)], height, width)
        if raster is None:
            continue
        local, x0, y0 = raster
        h, w = local.shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        c1 = _hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        c2 = _hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.3, 1.0))
        style = rng.integers(5)
        angle = rng.uniform(0, np.pi)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        period = rng.uniform(4, 16)
        if style == 0:
            t = np.zeros_like(u)
        elif style == 1:  # stripes
            t = (np.mod(u, period) < period / 2).astype(np.float32)
        elif style == 2:  # checkerboard
            t = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
        elif style == 3:  # linear gradient
            t = (u - u.min()) / max(float(np.ptp(u)), 1.0)
        else:  # dots
            t = ((np.mod(xx, period) - period / 2) ** 2 + (np.mod(yy, period) - period / 2) ** 2 < (period / 3) ** 2)
            t = t.astype(np.float32)
        texture = c1 * (1 - t[..., None]) + c2 * t[..., None]
        window = image[y0 : y0 + h, x0 : x0 + w]
        window[local] = texture[local]
        mask[y0 : y0 + h, x0 : x0 + w] |= local
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mask.astype(np.uint8)


def generate_item(split: str, index: int, seed: int = 0, height: int = 256, width: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Item `index` of `split` for `seed`: image uint8 (height, width, 3) and label uint8 (height, width)."""
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ValueError(f"height and width must be >= {MIN_SIZE}, got {height}x{width}")
    rng = item_rng(seed, split, index)
    if split == "outliers":
        return render_outliers(rng, height, width)
    return render_scene(rng, height, width, split)


def item_stem(split: str, index: int) -> str:
    """File stem of item `index`, shared by its image and label files."""
    return f"synthroad_{split}_{index:06d}"


def iter_items(split: str, num: int, seed: int = 0, height: int = 256, width: int = 512
               ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield (stem, image, label) for items 0..num-1."""
    for index in range(num):
        image, label = generate_item(split, index, seed, height, width)
        yield item_stem(split, index), image, label


def _check_arguments(split: str, num: int, seed: int, height: int, width: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if num < 1:
        raise ValueError(f"num={num}: expected at least 1 item")
    if seed < 0:
        raise ValueError(f"seed={seed}: expected a non-negative integer")
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ValueError(f"height={height}, width={width}: both must be >= {MIN_SIZE}")
