"""`mask2anomaly-export`: ONNX files of standard operators that ONNX Runtime and OpenVINO run like PyTorch.

References are PyTorch eager outputs of the same model (its default, faster attention form) in float64 (the
exact result up to float64 rounding: float32 rounding alone moves mask logits of magnitude ~50-130 by up to
~1e-4, so two float32 implementations can differ from each other by a little more than each differs from the
exact result) and, for the operator check, ONNX's own operator schema registry. Anomaly maps are compared with
those post-processed from PyTorch float32 eager. Models: the demo model and models converted from both
official fixtures (R-50 and Swin, converted as in tests/test_convert.py). The ONNX Runtime and OpenVINO extras
are installed by `make install` (and so in CI); a missing one fails these tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from shared_paths import SHARES_DEMO_EXPORT

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation
from modeling_mask2anomaly.conversion import convert_checkpoint
from modeling_mask2anomaly.deformable_attention import Mask2AnomalyMultiscaleDeformableAttention
from modeling_mask2anomaly.export import (
    ExportedLogits,
    MissingExtraError,
    eager_logits,
    export_onnx,
    load_runtime,
    main,
    max_abs_difference,
    onnx_operators,
)
from modeling_mask2anomaly.image_processing_mask2anomaly import Mask2AnomalyImageProcessor

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo_model"
SAMPLE = ROOT / "samples" / "synthroad_anomaly_000009.png"
FIXTURES = ROOT.parent / "shared" / "fixtures"
LOGIT_ATOL = 1e-4
# float32 keeps about 7 significant digits: on logits of magnitude M a float32 forward is off by ~1e-6 * M (the demo
# model's mask logits reach 168 at 224x448, and PyTorch's own float32 forward is 8e-5 off its float64 one there),
# so the logit bound is LOGIT_ATOL or LOGIT_RTOL_OF_SCALE * max |logit|, whichever is larger.
LOGIT_RTOL_OF_SCALE = 1e-6
MAP_ATOL = 1e-4
RUNTIMES = ("onnxruntime", "openvino")


@pytest.fixture
def demo_export(demo_onnx):
    """The demo model exported at 224x448 with a dynamic batch (conftest's `demo_onnx`; the fixture models below are
    exported with a fixed batch)."""
    return demo_onnx


def _check_runtime(model, processor, onnx_path, images: list[np.ndarray], runtime: str) -> None:
    """Logits of `runtime` within the logit bound (see LOGIT_RTOL_OF_SCALE) of PyTorch's float64 forward, anomaly
    maps within MAP_ATOL of those of PyTorch float32 eager."""
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    exact = eager_logits(model, pixel_values, torch.float64)
    with torch.no_grad():
        eager = model(pixel_values=pixel_values)
    class_logits, mask_logits = load_runtime(onnx_path, runtime)(pixel_values.numpy())
    assert class_logits.shape == tuple(eager.class_queries_logits.shape)
    differences = {
        "class logits": max_abs_difference(class_logits, exact[0]),
        "mask logits": max_abs_difference(mask_logits, exact[1]),
    }
    exported = ExportedLogits(torch.from_numpy(class_logits), torch.from_numpy(mask_logits))
    sizes = [image.shape[:2] for image in images]
    maps = [processor.post_process_anomaly_segmentation(o, target_sizes=sizes) for o in (eager, exported)]
    for eager_map, runtime_map, image in zip(*maps, images):
        assert runtime_map.shape == image.shape[:2]
        differences["anomaly map"] = max(differences.get("anomaly map", 0.0), max_abs_difference(runtime_map, eager_map))
    limits = {"class logits": max(LOGIT_ATOL, LOGIT_RTOL_OF_SCALE * float(np.abs(exact[0]).max())),
              "mask logits": max(LOGIT_ATOL, LOGIT_RTOL_OF_SCALE * float(np.abs(exact[1]).max())),
              "anomaly map": MAP_ATOL}
    assert all(differences[k] <= limits[k] for k in limits), (runtime, differences)


@SHARES_DEMO_EXPORT
def test_folder_holds_the_model_configs_and_readme(demo_export):
    files = {p.name for p in demo_export.iterdir()}
    assert {"model.onnx", "config.json", "preprocessor_config.json", "README.md", "export.json"} <= files
    # the remote code the configs name travels along, so the folder's configs load without this package
    for name in json.loads((demo_export / "config.json").read_text())["auto_map"].values():
        assert f"{name.split('.')[0]}.py" in files
    config = Mask2AnomalyConfig.from_pretrained(demo_export)
    assert config.to_diff_dict() | {"_name_or_path": None} == (
        Mask2AnomalyConfig.from_pretrained(DEMO).to_diff_dict() | {"_name_or_path": None}
    )
    processor = Mask2AnomalyImageProcessor.from_pretrained(demo_export)
    assert processor.to_dict() == Mask2AnomalyImageProcessor.from_pretrained(DEMO).to_dict()
    info = json.loads((demo_export / "export.json").read_text())
    assert info["input"] == {"name": "pixel_values", "shape": ["batch", 3, 224, 448], "dtype": "float32", "dynamic": True}
    for runtime in RUNTIMES:
        assert max(info["parity_max_abs_difference"][runtime].values()) <= LOGIT_ATOL
    assert set(info["parity_max_abs_difference"]) == {"torch_float32", *RUNTIMES}
    readme = (demo_export / "README.md").read_text()
    assert "onnxruntime: class logits" in readme and "openvino: class logits" in readme
    graph = onnx.load(str(demo_export / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["pixel_values"]
    assert [o.name for o in graph.output] == ["class_queries_logits", "masks_queries_logits"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 224, 448]


@SHARES_DEMO_EXPORT
def test_only_standard_onnx_operators(demo_export):
    """Every node is in the default ONNX domain and is an operator ONNX's schema registry knows at the model's
    opset; the deformable attention became GridSample."""
    model = onnx.load(str(demo_export / "model.onnx"))
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    assert set(opsets) == {"ai.onnx"}, opsets
    operators = onnx_operators(demo_export / "model.onnx")
    print("ONNX operators (domain, op):", sorted(operators))
    assert {domain for domain, _ in operators} == {"ai.onnx"}
    for _, op_type in operators:
        onnx.defs.get_schema(op_type, opsets["ai.onnx"], "")  # raises for an operator ONNX does not define
    assert ("ai.onnx", "GridSample") in operators
    assert opsets["ai.onnx"] >= 16


@SHARES_DEMO_EXPORT
def test_no_float64_anywhere_and_grid_sample_is_float32(demo_export):
    """What made ONNX Runtime refuse an earlier export: a float64 sampling grid next to float32 values."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(demo_export / "model.onnx")))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    assert onnx.TensorProto.DOUBLE not in set(types.values())
    grid_samples = [n for n in graph.node if n.op_type == "GridSample"]
    assert grid_samples
    for node in grid_samples:
        assert [types[name] for name in node.input] == [onnx.TensorProto.FLOAT] * 2


@SHARES_DEMO_EXPORT
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_demo_model_runtime_parity(demo_export, runtime):
    model = Mask2AnomalyForUniversalSegmentation.from_pretrained(DEMO).eval()
    processor = Mask2AnomalyImageProcessor.from_pretrained(demo_export)
    _check_runtime(model, processor, demo_export / "model.onnx", [np.asarray(Image.open(SAMPLE).convert("RGB"))], runtime)


@pytest.mark.parametrize("fixture", ["official_r50_small", "official_swin_small"])
def test_models_converted_from_official_fixtures_run_alike(fixture, tmp_path):
    folder = FIXTURES / fixture
    assert (folder / "checkpoint.pth").is_file(), f"missing parity fixture {folder}"
    converted = tmp_path / "converted"
    convert_checkpoint(folder / "checkpoint.pth", folder / "config.yaml", converted)
    model = Mask2AnomalyForUniversalSegmentation.from_pretrained(converted).eval()
    # as in tests/test_convert.py: the fixture images at their native size, padded to 32
    processor = Mask2AnomalyImageProcessor.from_pretrained(converted, do_resize=False)
    image = np.asarray(Image.open(folder / "img0_96x192.png").convert("RGB"))
    onnx_path = export_onnx(model, tmp_path / "model.onnx", height=96, width=192)
    # the export used the grid_sample form and gave the model back in its fast form
    backends = {m.backend for m in model.modules() if isinstance(m, Mask2AnomalyMultiscaleDeformableAttention)}
    assert backends == {"embedding_bag"}
    for runtime in RUNTIMES:
        _check_runtime(model, processor, onnx_path, [image], runtime)


@SHARES_DEMO_EXPORT
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_dynamic_batch(demo_export, runtime):
    model = Mask2AnomalyForUniversalSegmentation.from_pretrained(DEMO).eval()
    processor = Mask2AnomalyImageProcessor.from_pretrained(demo_export)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((ROOT / "samples").glob("*.png"))[:3]]
    for batch in (images[:2], images):
        _check_runtime(model, processor, demo_export / "model.onnx", batch, runtime)


@SHARES_DEMO_EXPORT
def test_other_sizes_are_refused_by_the_runtime(demo_export):
    """Height and width are fixed in the graph; ONNX Runtime refuses another size rather than mis-computing."""
    run = load_runtime(demo_export / "model.onnx", "onnxruntime")
    with pytest.raises(Exception, match="pixel_values"):
        run(np.zeros((1, 3, 96, 160), dtype=np.float32))


@pytest.mark.parametrize(
    "module,runtime,extra", [("onnxruntime", "onnxruntime", "onnx"), ("openvino", "openvino", "openvino")]
)
@SHARES_DEMO_EXPORT
def test_missing_runtime_names_the_extra(demo_export, monkeypatch, module, runtime, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingExtraError, match=rf"^{module} is not installed; install the \[{extra}\] extra"):
        load_runtime(demo_export / "model.onnx", runtime)


def test_cli_missing_extra_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert main([str(DEMO), "--output-dir", str(tmp_path), "--height", "128", "--width", "256"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "mask2anomaly-export: onnxscript is not installed; install the [onnx] extra: pip install 'mask2anomaly[onnx]'"
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--height", "100", "--width", "256"], "height=100 is not a positive multiple of 32"),
        (["--height", "128", "--width", "0"], "width=0 is not a positive multiple of 32"),
        (["--height", "128", "--width", "256", "--opset", "15"], "opset=15: ONNX GridSample needs opset 16"),
        (["--height", "128", "--width", "256", "--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_cli_refuses_bad_arguments(tmp_path, capsys, args, message):
    assert main([str(DEMO), "--output-dir", str(tmp_path / "out"), *args, "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_refuses_a_folder_without_a_model(tmp_path, capsys):
    assert main([str(tmp_path), "--output-dir", str(tmp_path / "out"), "--height", "64", "--width", "64"]) == 2
    assert "not a model folder (no config.json)" in capsys.readouterr().err


def test_load_runtime_refuses_unknown_runtime_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="runtime 'tensorrt' is not known"):
        load_runtime(tmp_path / "model.onnx", "tensorrt")
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        load_runtime(tmp_path / "model.onnx", "onnxruntime")
