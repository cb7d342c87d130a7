"""`mask2anomaly-export`: a Mask2Anomaly model folder -> an ONNX model that runs in stock ONNX Runtime and OpenVINO.

The output folder holds:

- ``model.onnx``: input ``pixel_values`` `(batch, 3, height, width)` float32 (what the image processor makes),
  outputs ``class_queries_logits`` `(batch, queries, num_labels + 1)` and ``masks_queries_logits``
  `(batch, queries, height / 4, width / 4)`, the model's final prediction. Only operators of the standard ONNX
  domain (the pixel decoder's deformable attention is exported in its `grid_sample` form, i.e. ONNX
  `GridSample`, opset >= 16), so no custom-op library is needed.
- ``config.json`` and ``preprocessor_config.json`` (with the remote-code files they name), so the folder carries
  what pre- and post-processing need: `Mask2AnomalyImageProcessor.from_pretrained(folder)` and its
  `post_process_anomaly_segmentation` work on the runtime's outputs as on PyTorch's.
- ``export.json`` (input size, whether it is dynamic, opset, exporter, parity measured at export) and a short
  ``README.md``.

Exporter: torch's `torch.export`-based ONNX exporter (`dynamo=True`), chosen deliberately over the legacy
TorchScript one: it converts the FX graph's exact dtypes (the legacy exporter's scalar type promotion is what
once gave a float64 sampling grid next to float32 values, which ONNX Runtime's `GridSample` refuses), it is the
exporter torch maintains (the TorchScript one is deprecated), it supports dynamic shapes through
`torch.export.Dim` (used for the batch), and it runs the ONNX optimiser (constant folding) on the result.

Needs the `[onnx]` extra (`onnx`, `onnxscript`; `onnxruntime` to verify); `--verify openvino` needs the
`[openvino]` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch is imported by the functions that need it, so that --help is quick
    import numpy as np
    import torch

Runtime = Literal["onnxruntime", "openvino"]
RUNTIMES: tuple[str, ...] = ("onnxruntime", "openvino")
INPUT_NAME = "pixel_values"
OUTPUT_NAMES: tuple[str, str] = ("class_queries_logits", "masks_queries_logits")
ONNX_FILE = "model.onnx"
EXPORT_INFO_FILE = "export.json"
DEFAULT_OPSET = 20  # GridSample needs >= 16; 20 is what torch's exporter targets by default
SIZE_MULTIPLE = 32  # the backbone's largest stride; the processor pads to it too
PARITY_ATOL = 1e-4


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def _require(module: str, extra: str) -> Any:
    """Import `module` or raise a one-line [`MissingExtraError`] naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{module} is not installed; install the [{extra}] extra: pip install 'mask2anomaly[{extra}]'"
        ) from err


@dataclass
class ExportedLogits:
    """The two outputs of an exported model as the image processor's post-processing takes them:
    `class_queries_logits` `(batch, queries, num_labels + 1)`, `masks_queries_logits` `(batch, queries, h, w)`."""

    class_queries_logits: torch.Tensor
    masks_queries_logits: torch.Tensor


def _logits_module(model: torch.nn.Module) -> torch.nn.Module:
    """`model` as a module `pixel_values -> (class_queries_logits, masks_queries_logits)`."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            outputs = self.model(pixel_values=pixel_values)
            return outputs.class_queries_logits, outputs.masks_queries_logits

    return Logits(model).eval()


def check_size(height: int, width: int) -> None:
    """Refuse an input size the model cannot take, with the reason."""
    for name, value in (("height", height), ("width", width)):
        if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
            raise ValueError(f"{name}={value} is not a positive multiple of {SIZE_MULTIPLE} (the backbone's stride)")


def _check_export_settings(height: int, width: int, opset: int) -> None:
    _require("onnx", "onnx")
    _require("onnxscript", "onnx")
    check_size(height, width)
    if opset < 16:
        raise ValueError(f"opset={opset}: ONNX GridSample needs opset 16 or later")


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    height: int,
    width: int,
    batch_size: int = 1,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export `model` (a `Mask2AnomalyForUniversalSegmentation`, float32) to an ONNX file at `path`.

    The pixel decoder's deformable attention is switched to its `grid_sample` form (ONNX `GridSample`) for the
    export and switched back afterwards. `dynamic=True` makes the batch dynamic; height and width stay fixed
    (transformers' Mask2Former derives sizes from the input shape in Python, so the graph holds them as
    constants).

    Returns the path written.
    """
    import torch

    from .deformable_attention import Mask2AnomalyMultiscaleDeformableAttention, set_deformable_attention_backend

    _check_export_settings(height, width, opset)
    path = Path(path)
    attentions = [m for m in model.modules() if isinstance(m, Mask2AnomalyMultiscaleDeformableAttention)]
    previous = [m.backend for m in attentions]
    set_deformable_attention_backend(model, "grid_sample")
    # transformers' attention layers (the Swin backbone's) in their eager form: the exporter's decomposition of
    # scaled_dot_product_attention gives strides that the Swin code's later `reshape` cannot view
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    previous_attention = {key: config._attn_implementation for key, config in configs.items()}
    for config in configs.values():
        if config._attn_implementation == "sdpa":
            config._attn_implementation = "eager"
    # Only the batch can be dynamic: transformers' Mask2Former computes sizes from the input's shape in Python
    # (reference points, position embeddings, attention-mask sizes), which the exported graph keeps as constants
    dynamic_shapes = {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic else None
    # torch.export specialises a dimension of size 1, so a dynamic batch needs an example of at least 2
    example = torch.zeros(max(batch_size, 2) if dynamic else batch_size, 3, height, width, dtype=torch.float32)
    try:
        program = torch.onnx.export(
            _logits_module(model),
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    finally:
        for module, backend in zip(attentions, previous):
            module.backend = backend
        for key, config in configs.items():
            config._attn_implementation = previous_attention[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=False)
    return path


def onnx_operators(path: str | Path) -> set[tuple[str, str]]:
    """`(domain, op_type)` of every node of the ONNX file, subgraphs and local functions included (the default
    domain is written `"ai.onnx"`)."""
    onnx = _require("onnx", "onnx")
    model = onnx.load(str(path), load_external_data=False)
    found: set[tuple[str, str]] = set()

    def visit(graph: Any) -> None:
        for node in graph.node:
            found.add((node.domain or "ai.onnx", node.op_type))
            for attribute in node.attribute:
                if attribute.g is not None and attribute.g.node:
                    visit(attribute.g)
                for subgraph in attribute.graphs:
                    visit(subgraph)

    visit(model.graph)
    for function in model.functions:
        for node in function.node:
            found.add((node.domain or "ai.onnx", node.op_type))
    return found


def load_runtime(path: str | Path, runtime: Runtime = "onnxruntime", num_threads: int | None = None
                 ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """An exported model in `runtime`, as a function `pixel_values (batch, 3, H, W) float32 ->
    (class_queries_logits, masks_queries_logits)` (numpy arrays): the `backends` class of that runtime (a graph of
    fixed size refuses another one by name). `num_threads` caps the runtime's threads."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not known; expected one of {RUNTIMES}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    import numpy as np
    import torch

    from .backends import ONNX_BACKENDS  # the one place a runtime session is made (backends imports this module)

    backend = ONNX_BACKENDS[runtime](path, num_threads=num_threads)

    def run(pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs = backend(torch.from_numpy(np.ascontiguousarray(pixel_values)))
        return outputs.class_queries_logits.numpy(), outputs.masks_queries_logits.numpy()

    return run


def max_abs_difference(a: Any, b: Any) -> float:
    """Largest absolute difference of two arrays/tensors of one shape, in float64."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a - b).max()) if a.size else 0.0


def eager_logits(model: torch.nn.Module, pixel_values: torch.Tensor, dtype: torch.dtype) -> tuple[Any, Any]:
    """Class and mask logits of `model` run in `dtype` (a copy when the dtype differs), as float64 numpy arrays."""
    import copy

    import torch

    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values.to(dtype))
    return outputs.class_queries_logits.double().numpy(), outputs.masks_queries_logits.double().numpy()


def runtime_parity(
    model: torch.nn.Module, onnx_path: str | Path, pixel_values: torch.Tensor, runtimes: Sequence[Runtime]
) -> dict[str, dict[str, float]]:
    """Max abs difference of class and mask logits to the float64 PyTorch forward of `model` (the exact result
    up to float64 rounding), for PyTorch float32 eager (`"torch_float32"`) and each runtime running `onnx_path`
    on `pixel_values`.

    Float64 is the reference because float32 rounding alone moves mask logits of magnitude ~100 by ~1e-4: two
    float32 implementations (PyTorch and a runtime) can each be that close to the exact result and differ from
    each other by a little more.
    """
    import torch

    exact = eager_logits(model, pixel_values, torch.float64)
    results = {"torch_float32": eager_logits(model, pixel_values, torch.float32)}
    for runtime in runtimes:
        results[runtime] = load_runtime(onnx_path, runtime)(pixel_values.numpy())
    return {
        name: {OUTPUT_NAMES[i]: max_abs_difference(logits[i], exact[i]) for i in range(2)}
        for name, logits in results.items()
    }


README_TEMPLATE = """# {name}: ONNX export

Exported with `mask2anomaly-export` from `{source}` (PyTorch {torch_version}, torch's `dynamo=True` ONNX
exporter, opset {opset}; only standard ONNX operators).

- input `pixel_values`: float32 `{input_shape}`, made by the image processor of this folder
  (`preprocessor_config.json`: resize, rescale, normalise, pad to a multiple of 32){size_note}
- outputs `class_queries_logits` `{class_shape}` and `masks_queries_logits` `{mask_shape}`; the anomaly map
  comes from the processor's `post_process_anomaly_segmentation`, exactly as for the PyTorch model.

```python
import numpy as np, onnxruntime as ort, torch
from modeling_mask2anomaly import Mask2AnomalyImageProcessor
from modeling_mask2anomaly.export import ExportedLogits

processor = Mask2AnomalyImageProcessor.from_pretrained("{folder}")
session = ort.InferenceSession("{folder}/model.onnx")
inputs = processor(image, return_tensors="np")  # image: an RGB uint8 array
class_logits, mask_logits = session.run(None, {{"pixel_values": inputs["pixel_values"]}})
anomaly_map = processor.post_process_anomaly_segmentation(
    ExportedLogits(torch.from_numpy(class_logits), torch.from_numpy(mask_logits)), target_sizes=[image.shape[:2]]
)[0]
```

OpenVINO reads the same file: `openvino.Core().compile_model("{folder}/model.onnx", "CPU")`.

Parity at export time: max abs difference to PyTorch's float64 forward (the exact result up to float64 rounding)
on a random RGB image of the export size, pre-processed; `torch_float32` is PyTorch's own float32 forward:
{parity}
"""


def _parity_lines(parity: dict[str, dict[str, float]]) -> str:
    if not parity:
        return "not measured (`--verify none`)."
    return "\n".join(
        f"- {runtime}: class logits {d[OUTPUT_NAMES[0]]:.2e}, mask logits {d[OUTPUT_NAMES[1]]:.2e}"
        for runtime, d in parity.items()
    )


def export_folder(
    model_path: str | Path,
    output_dir: str | Path,
    height: int,
    width: int,
    batch_size: int = 1,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    verify: Sequence[Runtime] = ("onnxruntime",),
    atol: float = PARITY_ATOL,
) -> dict[str, Any]:
    """Export the model folder `model_path` into `output_dir` (see the module docstring for what it holds).

    `verify` runs each runtime on a random image of the export size and compares with PyTorch's float64
    forward (see [`runtime_parity`]); a difference above `atol` raises `ValueError` (the files stay, for
    inspection). Returns what `export.json` holds.
    """
    import torch

    from .image_processing_mask2anomaly import Mask2AnomalyImageProcessor
    from .modeling_mask2anomaly import Mask2AnomalyForUniversalSegmentation
    from .remote_code import copy_remote_code

    for runtime in verify:
        if runtime not in RUNTIMES:
            raise ValueError(f"verify runtime {runtime!r} is not known; expected some of {RUNTIMES}")
        _require("onnxruntime" if runtime == "onnxruntime" else "openvino", "onnx" if runtime == "onnxruntime" else "openvino")
    _check_export_settings(height, width, opset)
    model_path, output_dir = Path(model_path), Path(output_dir)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"{model_path}: not a model folder (no config.json)")
    model = Mask2AnomalyForUniversalSegmentation.from_pretrained(model_path).float().eval()
    try:
        processor = Mask2AnomalyImageProcessor.from_pretrained(model_path)
    except OSError:
        processor = Mask2AnomalyImageProcessor.from_model_config(model.config)
    output_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(model, output_dir / ONNX_FILE, height, width, batch_size, dynamic, opset)
    model.config.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    copy_remote_code(output_dir)

    parity: dict[str, dict[str, float]] = {}
    if verify:
        # random RGB images of the export size through the processor: the logits' range of real inputs
        import numpy as np

        images = list(np.random.default_rng(0).integers(0, 256, (batch_size, height, width, 3), dtype=np.uint8))
        pixel_values = processor(images, do_resize=False, return_tensors="pt")["pixel_values"]
        parity = runtime_parity(model, onnx_path, pixel_values, verify)
    config = model.config
    queries, labels = config.num_queries, config.num_labels + 1
    batch: int | str = "batch" if dynamic else batch_size
    info = {
        "source": str(model_path),
        "onnx": ONNX_FILE,
        "input": {"name": INPUT_NAME, "shape": [batch, 3, height, width], "dtype": "float32", "dynamic": dynamic},
        "outputs": {OUTPUT_NAMES[0]: [batch, queries, labels], OUTPUT_NAMES[1]: [batch, queries, height // 4, width // 4]},
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=True)",
        "torch_version": torch.__version__,
        "parity_max_abs_difference": parity,
    }
    (output_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    size_note = (
        f"; the batch is dynamic, height and width are fixed at {height}x{width}" if dynamic
        else f"; fixed at {height}x{width}"
    ) + ": resize or pad images to it, or export again for another size"
    (output_dir / "README.md").write_text(README_TEMPLATE.format(
        name=model_path.name, source=model_path, torch_version=torch.__version__, opset=opset,
        input_shape=f"({batch}, 3, {height}, {width})", size_note=size_note,
        class_shape=f"({batch}, {queries}, {labels})", mask_shape=f"({batch}, {queries}, {height // 4}, {width // 4})",
        folder=output_dir.name, parity=_parity_lines(parity),
    ))
    bad = {f"{runtime} {name}": d for runtime, ds in parity.items() if runtime in RUNTIMES
           for name, d in ds.items() if not d <= atol}
    if bad:
        raise ValueError(
            f"exported model differs from PyTorch (float64) by more than {atol}: "
            + ", ".join(f"{k} {v:.2e}" for k, v in bad.items()) + f" (files kept in {output_dir})"
        )
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mask2anomaly-export",
        description="Export a Mask2Anomaly model folder to ONNX (model.onnx + configs + README) for ONNX Runtime "
                    "and OpenVINO.",
    )
    parser.add_argument("model", help="model folder (config.json + model.safetensors)")
    parser.add_argument("--output-dir", required=True, help="folder to write model.onnx, the configs and README into")
    parser.add_argument("--height", type=int, required=True, help="input height, a multiple of 32")
    parser.add_argument("--width", type=int, required=True, help="input width, a multiple of 32")
    parser.add_argument("--batch-size", type=int, default=1, help="batch of the input (default: %(default)s)")
    parser.add_argument("--dynamic", action="store_true",
                        help="dynamic batch size (height and width stay fixed: the graph holds sizes as constants)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset, >= 16 (default: %(default)s)")
    parser.add_argument("--verify", nargs="*", choices=RUNTIMES, default=["onnxruntime"],
                        help="runtimes to check against PyTorch on a random input (default: onnxruntime; "
                             "none: give the flag without values)")
    parser.add_argument("--atol", type=float, default=PARITY_ATOL,
                        help="largest allowed logit difference in verification (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 exported and verified, 1 verification failed, 2 bad arguments or
    a missing extra)."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print(f"mask2anomaly-export: --batch-size must be at least 1; got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        check_size(args.height, args.width)
        info = export_folder(args.model, args.output_dir, args.height, args.width, args.batch_size, args.dynamic,
                             args.opset, verify=args.verify, atol=args.atol)
    except (MissingExtraError, FileNotFoundError) as err:
        print(f"mask2anomaly-export: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"mask2anomaly-export: {err}", file=sys.stderr)
        return 1 if "differs from PyTorch" in str(err) else 2
    parity = info["parity_max_abs_difference"]
    print(f"wrote {Path(args.output_dir) / ONNX_FILE}" + "".join(
        f"; {runtime}: class {d[OUTPUT_NAMES[0]]:.1e}, mask {d[OUTPUT_NAMES[1]]:.1e}" for runtime, d in parity.items()
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
