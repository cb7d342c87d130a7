"""Hub serving: the Inference Endpoints handler called locally with a request in the endpoint's format, and the
Space app's prediction function (without gradio). Both load the model folder through its remote code."""

from __future__ import annotations

import ast
import base64
import importlib
import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image
from tiny_models import random_image, save_tiny_model

from modeling_mask2anomaly import CITYSCAPES_CLASSES
from modeling_mask2anomaly.visualize import CITYSCAPES_PALETTE

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parent.parent
HANDLER = REPO / "modeling_mask2anomaly" / "handler.py"
# what an Inference Endpoint image is sure to have, besides the standard library
ENDPOINT_MODULES = {"numpy", "PIL", "torch", "transformers"}


def _load_module(path: Path, name: str) -> ModuleType:
    """Import a file by its path, alone (no package around it): the handler as a model repository holds it, and the
    Space app."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.mark.parametrize("behaviour, expect_anomaly", [("anomalous", True), ("normal", False)])
def test_endpoint_handler_request(tmp_path, isolated_remote_code, behaviour, expect_anomaly):
    folder = save_tiny_model(tmp_path / "model", behaviour)
    handler_module = _load_module(HANDLER, "handler")
    handler = handler_module.EndpointHandler(path=str(folder))
    # served from the folder's remote code, not from this package
    assert type(handler.pipeline).__module__.startswith("transformers_modules.")

    image = random_image(26, 34, seed=11)
    response = handler({"inputs": _png_base64(image), "parameters": {"flip_tta": False}})
    assert isinstance(response, list) and response
    labels = [entry["label"] for entry in response]
    assert ("anomaly" in labels) is expect_anomaly
    assert set(labels) - {"anomaly"} <= set(CITYSCAPES_CLASSES)
    class_masks = []
    for entry in response:
        assert set(entry) == {"label", "score", "mask"} and isinstance(entry["score"], float)
        mask = Image.open(io.BytesIO(base64.b64decode(entry["mask"], validate=True)))
        assert mask.format == "PNG" and mask.mode == "L" and mask.size == (34, 26)
        values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255}
        if entry["label"] == "anomaly":
            assert (values == 255).all() and entry["score"] > 0.99  # every query says "no object"
        else:
            class_masks.append(values == 255)
    assert (np.sum(class_masks, axis=0) == 1).all(), "class masks tile the image"

    # a data: URI and raw bytes are the same request; a PIL image too
    data_uri = "data:image/png;base64," + _png_base64(image)
    raw = base64.b64decode(_png_base64(image))
    for inputs in (data_uri, raw, Image.fromarray(image)):
        again = handler({"inputs": inputs, "parameters": {"flip_tta": False}})
        assert [e["label"] for e in again] == labels and [e["mask"] for e in again] == [e["mask"] for e in response]

    # parameters named as the processor settings, and the older names as aliases: a threshold above every score
    # removes the anomaly entry either way
    for parameters in ({"anomaly_threshold": 2.0, "anomaly_scorer": "mask2anomaly"}, {"threshold": 2.0, "scorer": "mask2anomaly"}):
        high = handler({"inputs": _png_base64(image), "parameters": {"flip_tta": False, **parameters}})
        assert [e["label"] for e in high] == [label for label in labels if label != "anomaly"]


def test_endpoint_handler_refuses_bad_requests(tmp_path, isolated_remote_code):
    folder = save_tiny_model(tmp_path / "model", "random")
    handler = _load_module(HANDLER, "handler").EndpointHandler(str(folder))
    with pytest.raises(ValueError, match="not valid base64"):
        handler({"inputs": "/etc/passwd"})  # never read as a path on the endpoint
    with pytest.raises(ValueError, match="not a decodable image|Cannot read"):
        handler({"inputs": base64.b64encode(b"plain text, not a picture").decode()})
    with pytest.raises(ValueError, match=r"Unknown parameter\(s\) \['colour'\]"):
        handler({"inputs": _png_base64(random_image(8, 8)), "parameters": {"colour": "red"}})
    with pytest.raises(ValueError, match="'inputs'"):
        handler({"image": "..."})


def test_handler_stands_alone():
    """Copied into a model repository, the handler must not need this package: only the standard library, numpy,
    PIL, torch and transformers, and no relative import."""
    tree = ast.parse(HANDLER.read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import from .{node.module} in {HANDLER}"
            roots.add(node.module.split(".")[0])
    assert roots - sys.stdlib_module_names <= ENDPOINT_MODULES, roots
    assert {"transformers", "PIL"} <= roots, "the parser above missed the imports"
    packaged = importlib.import_module("modeling_mask2anomaly.handler")
    assert Path(packaged.__file__).resolve() == HANDLER


def test_space_predict_without_gradio(tmp_path, isolated_remote_code, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # gradio must only be needed to build the page
    folder = save_tiny_model(tmp_path / "model", "anomalous")
    app = _load_module(REPO / "app" / "app.py", "mask2anomaly_space_app")
    monkeypatch.setenv("MASK2ANOMALY_MODEL", str(folder))
    heatmap, semantic, summary = app.predict(Image.fromarray(random_image(30, 42, seed=12)))
    assert heatmap.mode == "RGB" and heatmap.height >= 30 and heatmap.width > 42
    # the semantic map, enlarged as the heatmap (same size), with its legend to the right
    assert semantic.mode == "RGB" and semantic.size == heatmap.size and heatmap.height % 30 == 0
    factor = heatmap.height // 30
    picture = np.asarray(semantic)[:, :42 * factor]
    assert set(map(tuple, picture.reshape(-1, 3))) <= set(CITYSCAPES_PALETTE)
    assert (np.asarray(semantic)[:, 42 * factor:].sum(axis=2) < 100).sum() > 20, "legend text beside the map"
    # "no object" everywhere: anomaly ~ 1 on every pixel
    assert "anomalous area 100.00%" in summary and "max anomaly score 1.000" in summary
    with pytest.raises(ModuleNotFoundError):
        app.build_demo()
    # the button's handler says what is wrong instead of raising (gradio shows bare "Error" badges)
    assert app.run(None) == (None, None, app.NO_IMAGE)
    with pytest.raises(ValueError, match="No image yet: upload a road image"):
        app.predict(None)


def test_space_shrinks_a_large_image_for_the_screen(tmp_path, isolated_remote_code, monkeypatch):
    """A 2048x1024 image is scored at full size but drawn at most 1024 wide, so the bar's labels keep their size."""
    folder = save_tiny_model(tmp_path / "model", "anomalous")
    app = _load_module(REPO / "app" / "app.py", "mask2anomaly_space_app_large")
    monkeypatch.setenv("MASK2ANOMALY_MODEL", str(folder))
    heatmap, semantic, summary = app.predict(random_image(1024, 2048, seed=13))
    assert summary.startswith("2048x1024 image: ")
    assert heatmap.height == 512 and 1024 < heatmap.width < 1024 + 320 and semantic.size == heatmap.size


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_endpoint_handler_refuses_images_above_its_pixel_limit_before_decoding(tmp_path, isolated_remote_code,
                                                                                monkeypatch):
    """An 8000x8000 PNG is ~200 KB but decodes into 192 MB of RGB: it is refused from its header (the decoder is
    never called), with the limit named; the limit is configurable, and PIL's bomb warning is an error."""
    folder = save_tiny_model(tmp_path / "model", "random")
    module = _load_module(HANDLER, "handler")
    handler = module.EndpointHandler(str(folder))
    assert handler.max_pixels == module.DEFAULT_MAX_PIXELS < 8000 * 8000
    bomb = _png_bytes(Image.new("L", (8000, 8000)))
    assert len(bomb) < 300_000
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size))
    with pytest.raises(ValueError, match=r"8000x8000 image \(64000000 pixels\).*at most 25000000"):
        handler({"inputs": base64.b64encode(bomb).decode()})
    assert decoded == []
    monkeypatch.undo()

    small = _png_base64(random_image(20, 30, seed=3))
    monkeypatch.setenv(module.MAX_PIXELS_VARIABLE, "500")
    limited = module.EndpointHandler(str(folder))
    with pytest.raises(ValueError, match=r"30x20 image \(600 pixels\).*at most 500"):
        limited({"inputs": small})
    with pytest.raises(ValueError, match=r"30x20 image"):
        limited({"inputs": Image.fromarray(random_image(20, 30))})
    assert module.EndpointHandler(str(folder), max_pixels=600)({"inputs": small, "parameters": {"flip_tta": False}})
    monkeypatch.setenv(module.MAX_PIXELS_VARIABLE, "lots")
    with pytest.raises(ValueError, match="MASK2ANOMALY_MAX_PIXELS='lots'"):
        module.EndpointHandler(str(folder))
    monkeypatch.delenv(module.MAX_PIXELS_VARIABLE)

    # under the handler's own limit but above PIL's warning threshold: PIL's warning is an error here
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    with pytest.raises(ValueError, match="decompression bomb"):
        handler({"inputs": small})


@pytest.mark.parametrize("parameters, message", [
    (["flip_tta"], r"'parameters' is list"),
    (3, r"'parameters' is int"),
    ("flip_tta=false", r"'parameters' is str"),
    ({"flip_tta": "false"}, r"Parameter 'flip_tta' is str 'false'; expected a JSON boolean"),
    ({"refine": 0}, r"Parameter 'refine' is int 0; expected a JSON boolean"),
    ({"anomaly_threshold": float("nan")}, r"Parameter 'anomaly_threshold' is float nan; expected a \(finite\)"),
    ({"threshold": float("inf")}, r"Parameter 'threshold' is float inf"),
    ({"anomaly_threshold": "high"}, r"Parameter 'anomaly_threshold' is str 'high'; expected a \(finite\) JSON number"),
    ({"anomaly_threshold": True}, r"Parameter 'anomaly_threshold' is bool"),
    ({"scorer": 3}, r"Parameter 'scorer' is int 3; expected a JSON string"),
    ({"anomaly_scorer": "loudest"}, r"scorer='loudest' is not one of"),
])
def test_endpoint_handler_checks_parameters_before_inference(tmp_path, isolated_remote_code, monkeypatch,
                                                             parameters, message):
    folder = save_tiny_model(tmp_path / "model", "random")
    handler = _load_module(HANDLER, "handler").EndpointHandler(str(folder))
    ran = []
    monkeypatch.setattr(handler.pipeline, "forward", lambda *args, **kwargs: ran.append(args))
    monkeypatch.setattr(handler.pipeline, "preprocess", lambda *args, **kwargs: ran.append(args))
    with pytest.raises(ValueError, match=message) as caught:
        handler({"inputs": _png_base64(random_image(8, 8)), "parameters": parameters})
    assert "\n" not in str(caught.value) and ran == []
