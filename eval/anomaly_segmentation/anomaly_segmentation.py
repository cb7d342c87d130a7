"""`evaluate` metric module for road-scene anomaly segmentation: pixel AuPRC, FPR95, AUROC and SegmentMeIfYouCan's
component sIoU, PPV and mean F1, computed by ``mask2anomaly_eval``'s streaming accumulators.

Score maps go straight into the accumulators instead of evaluate's Arrow cache (which costs seconds per few
million pixels and cannot hold 2-D maps of varying size), so ``add``, ``add_batch`` and ``compute`` keep
evaluate's calling conventions while running as fast as the core metrics.
"""

import os
import time
from typing import Any

import datasets
import evaluate
import numpy as np

from mask2anomaly_eval.metrics import (
    PIXEL_MODES,
    TRACK_SIZE_THRESHOLDS,
    ComponentMetricAccumulator,
    PixelMetricAccumulator,
    check_frame,
    evaluate_two_pass,
    merge_accumulators,
)

_CITATION = """\
@inproceedings{rai2023unmasking,
  title={Unmasking Anomalies in Road-Scene Segmentation},
  author={Rai, Shyam Nandan and Cermelli, Fabio and Fontanel, Dario and Masone, Carlo and Caputo, Barbara},
  booktitle={ICCV},
  year={2023}
}
@inproceedings{chan2021segmentmeifyoucan,
  title={SegmentMeIfYouCan: A Benchmark for Anomaly Segmentation},
  author={Chan, Robin and Lis, Krzysztof and Uhlemeyer, Svenja and Blum, Hermann and Honari, Sina and
          Siegwart, Roland and Fua, Pascal and Salzmann, Mathieu and Rottmann, Matthias},
  booktitle={NeurIPS Datasets and Benchmarks},
  year={2021}
}
"""

_DESCRIPTION = """\
Anomaly segmentation metrics for road scenes. Pixel level, on the pooled non-void pixels of all images (label 1
anomaly, 0 inlier, 255 void): AuPRC (average precision), FPR at 95% TPR and AUROC, either exact (equal to
scikit-learn and the Fishyscapes FPR95 convention, `mode="exact"`) or as the SegmentMeIfYouCan benchmark bins them
(`mode="smiyc"`: 768 dynamic bins per image; `mode="smiyc_uniform"`: 4096 uniform bins). Component level
(`components=True`), as SegmentMeIfYouCan defines it: the score map is thresholded at the pixel curve's best-F1
threshold, connected components are matched to ground-truth components, and the mean sIoU, mean PPV and the F1
averaged over sIoU/PPV thresholds 0.25, 0.30, ..., 0.75 are reported.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D float arrays / tensors / nested lists): anomaly score maps, higher = more anomalous.
        Images may have different sizes.
    references (`list` of 2-D integer arrays): label maps of the same sizes, 0 = inlier, 1 = anomaly, 255 = void.
    mode (`str`, default "exact"): "exact", "smiyc" or "smiyc_uniform" (pixel curve; see the description).
    components (`bool`, default False): also compute the SegmentMeIfYouCan component metrics.
    track (`str`, default "anomaly"): component size thresholds, "anomaly" (500 / 100 px) or "obstacle" (50 / 10 px).
    component_threshold (`float`, optional): fixed pixel threshold for the components (score > threshold) instead
        of the pixel curve's best-F1 threshold.
    cast_float16 (`bool`, default False): round scores to float16 first, as the SegmentMeIfYouCan pipeline does.
    The options can be given to `evaluate.load(...)` (defaults for this instance) or to `compute(...)`. Images added
    with `add`/`add_batch` are accumulated at once in the mode set at load time; with `components=True` and no
    `component_threshold` they are also kept (by reference) for the second pass over the components.
Returns:
    auprc (`float`), fpr95 (`float`), auroc (`float`): in [0, 1] (NaN where undefined, e.g. no anomaly pixel).
    best_f1 (`float`), best_f1_threshold (`float`), fpr95_threshold (`float`), num_pos (`int`), num_neg (`int`);
    mode="exact" adds fpr95_interpolated (`float`, the ood_metrics convention used by Mask2Anomaly's script).
    With components=True: siou (`float`), ppv (`float`), mean_f1 (`float`), f1_per_threshold (`list` of 11 floats,
    sIoU thresholds 0.25 ... 0.75), component_threshold (`float`) and the per-threshold TP/FN/FP counts.
Examples:
    >>> import numpy as np, evaluate
    >>> metric = evaluate.load("./eval/anomaly_segmentation")
    >>> scores = [np.array([[0.1, 0.9], [0.2, 0.8]], np.float32), np.array([[0.3, 0.7, 0.05]], np.float32)]
    >>> labels = [np.array([[0, 1], [0, 255]], np.uint8), np.array([[0, 1, 0]], np.uint8)]
    >>> result = metric.compute(predictions=scores, references=labels)
    >>> round(result["auprc"], 4), round(result["auroc"], 4), round(result["fpr95"], 4)
    (1.0, 1.0, 0.0)
"""

_OPTIONS = ("mode", "components", "track", "component_threshold", "cast_float16")
_INPUTS = "All required inputs are ['predictions', 'references']"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AnomalySegmentation(evaluate.Metric):
    """Streaming anomaly-segmentation metric (see the module description)."""

    def __init__(
        self,
        mode: str = "exact",
        components: bool = False,
        track: str = "anomaly",
        component_threshold: float | None = None,
        cast_float16: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._defaults = self._check_options(
            dict(mode=mode, components=components, track=track, component_threshold=component_threshold,
                 cast_float16=cast_float16)
        )
        self._reset()

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Documentation only: inputs never go through the Arrow writer (see the module docstring).
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint8"))),
                }
            ),
            codebase_urls=["https://github.com/SegmentMeIfYouCan/road-anomaly-benchmark"],
            reference_urls=["https://arxiv.org/abs/2307.13316", "https://segmentmeifyoucan.com"],
        )

    @staticmethod
    def _check_options(options: dict[str, Any]) -> dict[str, Any]:
        if options["mode"] not in PIXEL_MODES:
            raise ValueError(f"unknown mode {options['mode']!r}; expected one of {PIXEL_MODES}")
        if options["track"] not in TRACK_SIZE_THRESHOLDS:
            raise ValueError(f"unknown track {options['track']!r}; expected one of {tuple(TRACK_SIZE_THRESHOLDS)}")
        return options

    def _reset(self) -> None:
        options = self._defaults
        self._pixel = PixelMetricAccumulator(options["mode"], cast_float16=options["cast_float16"])
        self._component: ComponentMetricAccumulator | None = None
        if options["components"] and options["component_threshold"] is not None:
            self._component = ComponentMetricAccumulator(
                options["track"], options["component_threshold"], cast_float16=options["cast_float16"]
            )
        # Frames kept for the second (component) pass when the threshold comes from the pixel curve.
        self._kept: list[tuple] | None = [] if options["components"] and self._component is None else None

    def __len__(self) -> int:
        return self._pixel.num_images

    def _stream(self, prediction: Any, reference: Any) -> None:
        scores, labels = check_frame(prediction, reference)
        self._pixel.add(scores, labels)
        if self._component is not None:
            self._component.add(scores, labels)
        if self._kept is not None:
            self._kept.append((scores, labels))

    @staticmethod
    def _pairs(predictions: Any, references: Any) -> list[tuple]:
        predictions, references = list(predictions), list(references)
        if len(predictions) != len(references):
            raise ValueError(
                f"Mismatch in the number of predictions ({len(predictions)}) and references ({len(references)})"
            )
        return list(zip(predictions, references))

    def add(self, *, prediction: Any = None, reference: Any = None, **kwargs: Any) -> None:
        """Add one score map and its label map; they are accumulated at once (nothing goes to the Arrow cache).
        """
        if kwargs:
            raise ValueError(f"Bad inputs for evaluation module: {list(kwargs)}. {_INPUTS}")
        if prediction is None or reference is None:
            raise ValueError("add() needs both prediction= (a score map) and reference= (a label map)")
        self._stream(prediction, reference)

    def add_batch(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> None:
        """Add a batch (lists) of score maps and label maps; they are accumulated at once.
        """
        if kwargs:
            raise ValueError(f"Bad inputs for evaluation module: {list(kwargs)}. {_INPUTS}")
        if predictions is None or references is None:
            raise ValueError("add_batch() needs both predictions= and references= (lists of score maps and label maps)")
        for prediction, reference in self._pairs(predictions, references):
            self._stream(prediction, reference)

    def compute(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> dict[str, Any] | None:
        """Compute the metrics over everything added so far plus ``predictions``/``references``, then reset.

        Keyword options (mode, components, track, component_threshold, cast_float16) override those given at load.
        """
        unknown = [key for key in kwargs if key not in _OPTIONS]
        if unknown:
            raise ValueError(f"unknown compute() option(s) {unknown}; expected some of {list(_OPTIONS)}")
        options = self._check_options({**self._defaults, **kwargs})
        if (predictions is None) != (references is None):
            raise ValueError("compute() needs both predictions= and references=, or neither")
        given = self._pairs(predictions, references) if predictions is not None else []
        try:
            if self.num_process > 1:
                return self._compute_distributed(given, options)
            return self._compute_local(given, options)
        finally:
            self._reset()

    def _compute_local(self, given: list[tuple], options: dict[str, Any]) -> dict[str, Any]:
        streamed = self._pixel.num_images
        if streamed == 0 and not given:
            raise ValueError("no image was added; pass predictions= and references= or call add()/add_batch() first")
        if streamed == 0:
            # Everything is at hand: the core two-pass evaluation over the given lists.
            return self._two_pass(given, options)
        same_pixels = all(options[key] == self._defaults[key] for key in ("mode", "cast_float16"))
        if not same_pixels:
            if self._kept is None:
                raise ValueError(
                    f"{streamed} image(s) were accumulated with mode={self._defaults['mode']!r}, "
                    f"cast_float16={self._defaults['cast_float16']} and not kept; pass the options to "
                    "evaluate.load(...) before adding images, or give all images to compute()"
                )
            return self._two_pass(self._kept + given, options)
        for prediction, reference in given:
            self._stream(prediction, reference)
        result = self._pixel.compute()
        if options["components"]:
            same_components = all(options[key] == self._defaults[key] for key in ("track", "component_threshold"))
            component = self._component if same_components else None
            if component is None:
                if self._kept is None:
                    raise ValueError(
                        "component metrics need every image again, but the added images were not kept; pass "
                        "components=True (and track=...) to evaluate.load(...) before adding images, or give all "
                        "images to compute()"
                    )
                threshold = options["component_threshold"]
                component = ComponentMetricAccumulator(
                    options["track"],
                    result["best_f1_threshold"] if threshold is None else threshold,
                    cast_float16=options["cast_float16"],
                )
                for scores, labels in self._kept:
                    component.add(scores, labels)
            result.update(component.compute())
        return result

    @staticmethod
    def _two_pass(frames: list[tuple], options: dict[str, Any]) -> dict[str, Any]:
        return evaluate_two_pass(lambda: iter(frames), **options)

    # ---- several processes (num_process > 1): each writes its accumulators, process 0 merges them ----
    # The shards are plain numpy arrays (``np.savez``, read back with ``allow_pickle=False``): a file planted in the
    # cache folder can at worst give wrong numbers or an error, never run code.

    def _shard_path(self, process_id: int) -> str:
        return os.path.join(self.data_dir, f"{self.experiment_id}-{self.num_process}-{process_id}.m2a.npz")

    def _write_shard(self, path: str) -> None:
        arrays = {f"pixel.{key}": value for key, value in self._pixel.state_dict().items()}
        if self._component is not None:
            arrays.update({f"component.{key}": value for key, value in self._component.state_dict().items()})
        with open(path + ".tmp", "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(path + ".tmp", path)  # atomic: process 0 never reads a partial file

    def _read_shard(self, path: str) -> tuple:
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
            pixel = PixelMetricAccumulator.from_state_dict(
                {key[len("pixel."):]: value for key, value in arrays.items() if key.startswith("pixel.")},
                cast_float16=self._defaults["cast_float16"],
            )
            component_state = {key[len("component."):]: value for key, value in arrays.items()
                               if key.startswith("component.")}
            component = ComponentMetricAccumulator.from_state_dict(component_state) if component_state else None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(f"{path}: not a shard of this metric's processes ({error})") from None
        return pixel, component

    def _compute_distributed(self, given: list[tuple], options: dict[str, Any]) -> dict[str, Any] | None:
        if any(options[key] != self._defaults[key] for key in _OPTIONS):
            raise ValueError("with num_process > 1, pass the options to evaluate.load(...), not to compute()")
        if options["components"] and options["component_threshold"] is None:
            raise ValueError(
                "with num_process > 1 the component metrics need a fixed component_threshold (the frames of the "
                "other processes are not available for a second pass); compute the pixel metrics first and pass "
                "their best_f1_threshold"
            )
        for prediction, reference in given:
            self._stream(prediction, reference)
        self._write_shard(self._shard_path(self.process_id))
        if self.process_id != 0:
            return None
        paths = [self._shard_path(i) for i in range(self.num_process)]
        deadline = time.monotonic() + self.timeout
        while not all(os.path.exists(p) for p in paths):
            if time.monotonic() > deadline:
                missing = [p for p in paths if not os.path.exists(p)]
                raise ValueError(f"timed out after {self.timeout} s waiting for the other processes' results {missing}")
            time.sleep(0.05)
        shards = []
        for shard_path in paths:
            shards.append(self._read_shard(shard_path))
            os.remove(shard_path)
        pixel = merge_accumulators([shard[0] for shard in shards])
        if pixel.num_images == 0:
            raise ValueError("no image was added in any process")
        result = pixel.compute()
        if options["components"]:
            result.update(merge_accumulators([shard[1] for shard in shards]).compute())
        return result
