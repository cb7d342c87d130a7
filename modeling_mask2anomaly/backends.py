"""Forward backends of inference: what maps a batch of `pixel_values` to class and mask logits.

The one pre- and post-processing path (`inference.predict_batch`: the image processor, then
`post_process_anomaly_and_semantic`) is the same for every backend; a backend only runs the network:

- ``torch``: the PyTorch model (`TorchBackend`), eager or compiled with `torch.compile` (``compile=True``);
- ``onnxruntime``: a `model.onnx` written by `mask2anomaly-export`, in ONNX Runtime (the ``[onnx]`` extra);
- ``openvino``: the same file in OpenVINO (the ``[openvino]`` extra).

An exported folder (model.onnx + config.json + preprocessor_config.json) is itself a model for the ONNX
backends: `load_backend(folder, "onnxruntime")` gives the backend and the folder's processor. An ONNX graph of
fixed height and width reports it as `Backend.input_size`; the inference path then pads each image's processed
size to it (shrinking the image to fit first when it is larger and resizing is on), see
`inference.backend_input_size`.

Not remote code (local inference driver).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

from .export import INPUT_NAME, ONNX_FILE, OUTPUT_NAMES, MissingExtraError, _require

BackendName = Literal["torch", "onnxruntime", "openvino"]
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "openvino")
#: the extra that installs each ONNX backend's runtime
BACKEND_EXTRAS: dict[str, str] = {"onnxruntime": "onnx", "openvino": "openvino"}


class Backend:
    """
    The network of an inference backend: `backend(pixel_values)` with `pixel_values` `(batch, 3, height, width)`
    float32 (what the image processor makes) returns class logits `(batch, queries, num_labels + 1)` and mask
    logits `(batch, queries, height / 4, width / 4)` as a `Mask2FormerForUniversalSegmentationOutput`.

    Attributes:
        name: the backend's name (one of `BACKENDS`).
        device: where `pixel_values` go.
        dtype: the dtype `pixel_values` are cast to.
        input_size: the (height, width) the graph is fixed to, or None when it takes any multiple of 32.
        batch_size: the batch the graph is fixed to, or None; a batch of another size is run in chunks of it.
    """

    name: str = ""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    input_size: tuple[int, int] | None = None
    batch_size: int | None = None

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class and mask logits of one batch of the graph's batch size."""
        raise NotImplementedError

    def __call__(self, pixel_values: torch.Tensor) -> Mask2FormerForUniversalSegmentationOutput:
        if self.input_size is not None and tuple(pixel_values.shape[-2:]) != tuple(self.input_size):
            height, width = self.input_size
            raise ValueError(f"the {self.name} model takes {height}x{width} inputs only; got pixel_values of "
                             f"{pixel_values.shape[-2]}x{pixel_values.shape[-1]} (pad them to its size)")
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        fixed = self.batch_size
        if fixed is None or len(pixel_values) == fixed:
            class_logits, mask_logits = self.forward(pixel_values)
        else:
            # a graph of fixed batch: chunks of it, the last one filled up with zeros whose outputs are dropped
            parts = []
            for start in range(0, len(pixel_values), fixed):
                chunk = pixel_values[start:start + fixed]
                count = len(chunk)
                if count < fixed:
                    chunk = torch.cat([chunk, chunk.new_zeros((fixed - count, *chunk.shape[1:]))])
                class_logits, mask_logits = self.forward(chunk)
                parts.append((class_logits[:count], mask_logits[:count]))
            class_logits = torch.cat([c for c, _ in parts])
            mask_logits = torch.cat([m for _, m in parts])
        return Mask2FormerForUniversalSegmentationOutput(class_queries_logits=class_logits,
                                                         masks_queries_logits=mask_logits)

    def __repr__(self) -> str:
        size = "any size" if self.input_size is None else f"{self.input_size[0]}x{self.input_size[1]}"
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype}, input {size})"


class TorchBackend(Backend):
    """
    A PyTorch model as a backend, run in eval mode without gradients (its train/eval mode is restored after each
    call). `compile=True` runs it through `torch.compile` (`compile_backend`, default inductor; `compile_mode`,
    e.g. "max-autotune"): the first batch of each new input size compiles, later ones reuse the compiled graph.

    `device` defaults to the model's, the input dtype is that of its first floating-point parameter.
    """

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: str | torch.device | None = None, compile: bool = False,
                 compile_mode: str | None = None, compile_backend: str = "inductor") -> None:
        from .inference import _input_placement

        self.model = model
        self.device, self.dtype = _input_placement(model, device)
        self.compiled = bool(compile)
        self._run = torch.compile(model, mode=compile_mode, backend=compile_backend) if compile else model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                outputs = self._run(pixel_values=pixel_values)
        finally:
            self.model.train(was_training)
        return outputs.class_queries_logits, outputs.masks_queries_logits


def _static_dims(shape: list[Any]) -> tuple[int | None, tuple[int, int] | None]:
    """(batch, (height, width)) of an NCHW input shape whose entries are ints (fixed) or anything else (dynamic)."""
    fixed = [int(d) if isinstance(d, (int, np.integer)) and int(d) > 0 else None for d in shape]
    if len(fixed) != 4:
        raise ValueError(f"the ONNX model's input {INPUT_NAME!r} has shape {shape}; expected (batch, 3, height, width)")
    size = (fixed[2], fixed[3]) if fixed[2] is not None and fixed[3] is not None else None
    return fixed[0], size


class OnnxRuntimeBackend(Backend):
    """An exported `model.onnx` in ONNX Runtime: the CPU provider, or CUDA's with `device="cuda"` (needs the
    onnxruntime-gpu build). `num_threads` caps the intra-op threads (default: ONNX Runtime's choice)."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu",
                 num_threads: int | None = None) -> None:
        ort = _require("onnxruntime", BACKEND_EXTRAS[self.name])
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError("--device cuda with the onnxruntime backend needs onnxruntime-gpu (this onnxruntime "
                                 f"has the providers {ort.get_available_providers()}); use --device cpu")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0})]
        elif self.device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"the onnxruntime backend runs on cpu or cuda; got --device {self.device}")
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.fspath(path), options, providers=providers)
        inputs = {i.name: i for i in self.session.get_inputs()}
        if INPUT_NAME not in inputs:
            raise ValueError(f"{path}: the ONNX model has no input {INPUT_NAME!r} (inputs: {sorted(inputs)}); "
                             "export it with mask2anomaly-export")
        self.batch_size, self.input_size = _static_dims(list(inputs[INPUT_NAME].shape))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feed = {INPUT_NAME: np.ascontiguousarray(pixel_values.cpu().numpy())}
        class_logits, mask_logits = self.session.run(list(OUTPUT_NAMES), feed)
        return torch.from_numpy(class_logits), torch.from_numpy(mask_logits)


class OpenVINOBackend(Backend):
    """An exported `model.onnx` in OpenVINO on the CPU, in float32 (OpenVINO would otherwise pick bf16/f16 on CPUs
    that have them). `num_threads` caps its inference threads."""

    name = "openvino"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu",
                 num_threads: int | None = None) -> None:
        ov = _require("openvino", BACKEND_EXTRAS[self.name])
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise ValueError(f"the openvino backend runs on the CPU here; got --device {self.device} (use --device cpu "
                             "or the onnxruntime/torch backend on a GPU)")
        core = ov.Core()
        network = core.read_model(os.fspath(path))
        names = {name for port in network.inputs for name in port.get_names()}
        if INPUT_NAME not in names:
            raise ValueError(f"{path}: the ONNX model has no input {INPUT_NAME!r} (inputs: {sorted(names)}); "
                             "export it with mask2anomaly-export")
        shape = network.input(INPUT_NAME).get_partial_shape()
        self.batch_size, self.input_size = _static_dims(
            [dim.get_length() if dim.is_static else None for dim in shape]
        )
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = int(num_threads)
        self.compiled = core.compile_model(network, "CPU", config)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        result = self.compiled({INPUT_NAME: np.ascontiguousarray(pixel_values.cpu().numpy())})
        return (torch.from_numpy(np.array(result[OUTPUT_NAMES[0]])),
                torch.from_numpy(np.array(result[OUTPUT_NAMES[1]])))


ONNX_BACKENDS: dict[str, type[Backend]] = {"onnxruntime": OnnxRuntimeBackend, "openvino": OpenVINOBackend}


def check_backend_options(backend: str, dtype: torch.dtype = torch.float32, compile: bool = False) -> None:
    """Refuse a backend name that is not known and options that only the torch backend has, with the reason."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r} is not known; expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return
    if compile:
        raise ValueError(f"--compile is for the torch backend (torch.compile); the {backend} backend compiles the "
                         "ONNX graph itself")
    if dtype != torch.float32:
        raise ValueError(f"--dtype {str(dtype).removeprefix('torch.')} is for the torch backend; the {backend} "
                         "backend runs the exported float32 graph")
    _require(backend, BACKEND_EXTRAS[backend])


def onnx_file(model_name_or_path: str | os.PathLike) -> Path:
    """The `model.onnx` of an exported folder (or the .onnx file itself), or a one-line error saying how to make one."""
    path = Path(model_name_or_path)
    if path.is_file() and path.suffix == ".onnx":
        return path
    if (path / ONNX_FILE).is_file():
        return path / ONNX_FILE
    if path.is_dir():
        raise FileNotFoundError(
            f"{path} has no {ONNX_FILE}: the onnxruntime/openvino backends run an exported folder; make one with "
            f"`mask2anomaly-export {path} --output-dir EXPORTED --height H --width W` and pass --model EXPORTED"
        )
    raise FileNotFoundError(f"{path}: no such folder; the onnxruntime/openvino backends need a local folder written "
                            "by mask2anomaly-export (model.onnx + config.json + preprocessor_config.json)")


def load_backend(
    model_name_or_path: str | os.PathLike,
    backend: BackendName = "torch",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    num_threads: int | None = None,
) -> tuple[Backend, Any]:
    """
    A backend and the image processor of a model folder (or Hub id, torch backend only).

    - ``torch``: `inference.load_model_and_processor` (weights in `dtype`, on `device`), compiled with
      `compile=True`;
    - ``onnxruntime`` / ``openvino``: the folder's `model.onnx` (as `mask2anomaly-export` writes it) with the
      processor of its preprocessor_config.json (the legacy rules of `load_model_and_processor` apply); float32
      only; `num_threads` caps the runtime's threads.

    A missing runtime raises `MissingExtraError` (an ImportError) whose one-line message names the extra to install.
    """
    from .configuration_mask2anomaly import Mask2AnomalyConfig
    from .inference import load_model_and_processor, load_processor

    check_backend_options(backend, dtype, compile)
    if backend == "torch":
        model, processor = load_model_and_processor(model_name_or_path, device, dtype)
        return TorchBackend(model, device, compile=compile), processor
    path = onnx_file(model_name_or_path)
    folder = path.parent
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json beside {path.name}; the exported folder carries the "
                                "model and processor configs (export it again with mask2anomaly-export)")
    config = Mask2AnomalyConfig.from_pretrained(folder)
    return ONNX_BACKENDS[backend](path, device, num_threads=num_threads), load_processor(folder, config)


__all__ = [
    "BACKENDS",
    "BACKEND_EXTRAS",
    "Backend",
    "BackendName",
    "MissingExtraError",
    "OnnxRuntimeBackend",
    "OpenVINOBackend",
    "TorchBackend",
    "check_backend_options",
    "load_backend",
    "onnx_file",
]
