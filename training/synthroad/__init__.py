"""SynthRoad: a procedural road-scene generator for training, testing and demonstrating Mask2Anomaly on a CPU.

Cityscapes, COCO and the SegmentMeIfYouCan benchmarks are large, licensed downloads that are not available on
every machine (in particular not on the CPU-only machines this project is developed and tested on). SynthRoad
stands in for them so that the whole method -- closed-set training, outlier exposure with pasted objects, and
anomaly evaluation -- can run end to end anywhere, in seconds. It is a stand-in, not a benchmark: numbers
measured on it say nothing about real road scenes.

Scenes are rendered with a pinhole camera over a flat ground plane: a straight road with lane markings and
crosswalks, sidewalks, terrain, facades (buildings with windows, walls, fences, hedges), sky, poles with
traffic signs and lights, trees, vehicles (car, truck, bus, seen as 3-D boxes), people, riders on bicycles and
motorcycles, cast shadows, global lighting and colour casts. Labels are Cityscapes train ids (255 void).

Splits (`SPLITS`):

- ``train`` / ``val``: road scenes, label = train ids (0..18, 255 void for the ego-vehicle hood).
- ``anomaly``: RoadAnomaly21-style, 1-3 large unusual objects anywhere in the scene (animal silhouettes with fur
  patterns, boulders with photo-like fractal texture, wood logs); label 0 = not anomaly, 1 = anomaly, 255 = void
  (a thin border around each anomaly and the ego hood).
- ``obstacle``: RoadObstacle21-style, 1-4 small obstacles on the road (traffic cones, cardboard boxes, tyres,
  stones, small animals); label 0 = road, 1 = obstacle, 255 = everything off the road.
- ``outliers``: the outlier-exposure source, an image with 1-3 objects and its binary mask (0/1). Its objects
  are random polygons and Fourier blobs with flat, striped, checkered, dotted or gradient colours -- families
  that never appear in ``anomaly``/``obstacle``, so a model trained with them is tested on unseen anomalies.

Every item is a pure function of (seed, split, index): the same arguments give identical bytes, and an item does
not depend on how many items are generated. Command line: ``mask2anomaly-synthroad --split train --num 100
--seed 0 --output-dir data/synthroad/train``; Python: ``synthroad_dataset("train", 100, seed=0)``.

Modules: `labels` (train ids, splits), `painters` (canvas, camera, object/anomaly/obstacle painters), `scenes`
(road scenes, outlier images, items), `dataset` (`synthroad_dataset`), `cli` (``mask2anomaly-synthroad``).
`synthroad_dataset` is loaded on first use, so that the command line (numpy and PIL) does not import `datasets`.
"""

from __future__ import annotations

from typing import Any

from .cli import main, write_png_atomic
from .labels import (
    BICYCLE,
    BUILDING,
    BUS,
    CAR,
    FENCE,
    GENERATOR_VERSION,
    MIN_SIZE,
    MOTORCYCLE,
    PERSON,
    POLE,
    RIDER,
    ROAD,
    SIDEWALK,
    SKY,
    SPLITS,
    TERRAIN,
    TRAFFIC_LIGHT,
    TRAFFIC_SIGN,
    TRAIN,
    TRUCK,
    VEGETATION,
    VOID,
    WALL,
)
from .scenes import generate_item, item_rng, item_stem, iter_items, render_outliers, render_scene


def __getattr__(name: str) -> Any:
    """`synthroad_dataset` (module `dataset`, which imports `datasets`) on first access."""
    if name == "synthroad_dataset":
        from .dataset import synthroad_dataset

        return synthroad_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BICYCLE", "BUILDING", "BUS", "CAR", "FENCE", "GENERATOR_VERSION", "MIN_SIZE", "MOTORCYCLE", "PERSON", "POLE",
    "RIDER", "ROAD", "SIDEWALK", "SKY", "SPLITS", "TERRAIN", "TRAFFIC_LIGHT", "TRAFFIC_SIGN", "TRAIN", "TRUCK",
    "VEGETATION", "VOID", "WALL", "generate_item", "item_rng", "item_stem", "iter_items", "main", "render_outliers",
    "render_scene", "synthroad_dataset", "write_png_atomic",
]
