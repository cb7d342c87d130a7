"""SynthRoad's label values and splits: Cityscapes train ids, void, the renderer's anomaly marker, sizes."""

from __future__ import annotations

SPLITS: tuple[str, ...] = ("train", "val", "anomaly", "obstacle", "outliers")
# Part of every item's seed: one fixed code per split keeps splits independent of each other.
_SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
# Bump whenever rendering changes, so that cached datasets built from an older generator are not reused.
GENERATOR_VERSION = 1

# Cityscapes train ids.
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN = 0, 1, 2, 3, 4, 5, 6, 7
VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(8, 19)
VOID = 255
# Internal label of anomalies/obstacles while rendering, turned into 1 by the anomaly and obstacle splits; it
# never leaves the renderer. (Not `modeling_mask2anomaly.OUTLIER_LABEL`, the training label of pasted outliers:
# importing the model package would load torch and transformers into this numpy/PIL generator.)
RENDERED_ANOMALY = 254

MIN_SIZE = 64

#: the file `mask2anomaly-synthroad` writes beside images/ and labels/: split, number, seed, size, generator version
METADATA_NAME = "synthroad.json"
