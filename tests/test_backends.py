"""Inference backends (`backends.py`) and `mask2anomaly-predict --backend/--compile`: ONNX Runtime and OpenVINO give
the torch backend's maps on the demo model, through the one pre/post-processing path; graphs of fixed size get
images padded (or shrunk) to their size, computed here independently; a missing extra names itself in one line.

References: the torch backend (the PyTorch model), and for the size handling the demo model run here on images
padded / resized by hand (PIL) and post-processed with the processor. The [onnx] and [openvino] extras are
installed by `make install` (and so in CI); a missing one fails these tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shared_paths import REPO_ROOT, SHARES_DEMO_EXPORT
from tiny_models import random_image
from transformers.image_utils import SizeDict

from modeling_mask2anomaly.backends import (
    Backend,
    MissingExtraError,
    OnnxRuntimeBackend,
    OpenVINOBackend,
    TorchBackend,
    load_backend,
)
from modeling_mask2anomaly.inference import backend_input_size, load_model_and_processor, predict_anomaly
from modeling_mask2anomaly.predict import main

ROOT = REPO_ROOT
DEMO = ROOT / "demo_model"
SAMPLES = sorted((ROOT / "samples").glob("*.png"))
EXPORT_SIZE = (224, 448)  # the demo processor's size for 1:2 road images (shortest side 224)
MAP_ATOL = 1e-4
RUNTIMES = {"onnxruntime": OnnxRuntimeBackend, "openvino": OpenVINOBackend}

pytestmark = [pytest.mark.usefixtures("single_thread"), SHARES_DEMO_EXPORT]


@pytest.fixture
def exported(demo_onnx) -> Path:
    """The demo model exported at 224x448 (fixed size, dynamic batch; conftest's `demo_onnx`)."""
    return demo_onnx


@pytest.fixture(scope="module")
def demo():
    model, processor = load_model_and_processor(DEMO)
    return model, processor


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _reference(model, processor, rgb: np.ndarray, fitted: tuple[int, int], pad: tuple[int, int],
               flip: bool) -> np.ndarray:
    """Anomaly map computed here: the image resized by hand (PIL bilinear) to `fitted`, the processor without its
    resize padding it to `pad`, the PyTorch model, the processor's post-processing; flip TTA by hand."""

    def single(image: np.ndarray) -> torch.Tensor:
        if image.shape[:2] != fitted:
            image = np.asarray(Image.fromarray(image).resize(fitted[::-1], resample=Image.BILINEAR))
        inputs = processor(image, do_resize=False, pad_size=SizeDict(height=pad[0], width=pad[1]), return_tensors="pt")
        assert tuple(inputs["pixel_values"].shape[-2:]) == pad
        with torch.no_grad():
            outputs = model(pixel_values=inputs["pixel_values"])
        return processor.post_process_anomaly_segmentation(outputs, [rgb.shape[:2]], image_sizes=[fitted])[0]

    plain = single(rgb)
    if not flip:
        return plain.numpy()
    return ((plain + single(np.ascontiguousarray(rgb[:, ::-1])).flip(-1)) / 2).numpy()


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_runtime_maps_equal_the_torch_backend(exported, runtime):
    images = [_rgb(path) for path in SAMPLES]
    torch_backend, processor = load_backend(DEMO, "torch")
    assert all(processor.processed_size(image.shape[:2]) == EXPORT_SIZE for image in images)  # 128x256 enlarged
    backend, exported_processor = load_backend(exported, runtime)
    assert isinstance(backend, RUNTIMES[runtime])
    assert backend.input_size == EXPORT_SIZE and backend.batch_size is None  # fixed size, dynamic batch
    assert exported_processor.to_dict() == processor.to_dict()
    reference = predict_anomaly(torch_backend, processor, images)  # flip TTA and refinement on (the defaults)
    results = predict_anomaly(backend, exported_processor, images, batch_size=3)  # batches of 3 and 2
    for ref, got in zip(reference, results):
        np.testing.assert_allclose(got.anomaly_map, ref.anomaly_map, atol=MAP_ATOL, rtol=0)
        assert (got.semantic_map == ref.semantic_map).mean() > 0.999
    # the Python API loads an exported folder by name
    (by_name,) = predict_anomaly(exported, None, images[0], backend=runtime)
    np.testing.assert_array_equal(by_name.anomaly_map, results[0].anomaly_map)


class FixedBatchOfTwo(Backend):
    """The demo model behind a graph of fixed batch 2 (what `mask2anomaly-export --batch-size 2` writes), recording
    the batch of every forward."""

    name = "fixed"
    batch_size = 2

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.batches = model, []

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.batches.append(len(pixel_values))
        with torch.no_grad():
            outputs = self.model(pixel_values=pixel_values)
        return outputs.class_queries_logits, outputs.masks_queries_logits


def test_fixed_batch_graph_runs_in_chunks_the_last_one_filled_up(demo):
    """5 images in one batch on a batch-2 graph: forwards of 2, 2 and 2 (the fifth image and a zero image whose
    outputs are dropped); the maps are those of the model run one image at a time."""
    model, processor = demo
    images = [_rgb(path) for path in SAMPLES]
    assert len(images) == 5
    backend = FixedBatchOfTwo(model)
    results = predict_anomaly(backend, processor, images, batch_size=5, flip_tta=False)
    assert backend.batches == [2, 2, 2]
    for image, got in zip(images, results):
        (ref,) = predict_anomaly(model, processor, image, flip_tta=False)
        np.testing.assert_allclose(got.anomaly_map, ref.anomaly_map, atol=1e-5, rtol=0)
        assert (got.semantic_map == ref.semantic_map).mean() > 0.999


def test_torch_backend_is_the_model(demo):
    model, processor = demo
    images = [_rgb(SAMPLES[0]), random_image(50, 70, seed=3)]
    for plain, wrapped in zip(predict_anomaly(model, processor, images),
                              predict_anomaly(TorchBackend(model), processor, images)):
        np.testing.assert_array_equal(wrapped.anomaly_map, plain.anomaly_map)
        np.testing.assert_array_equal(wrapped.semantic_map, plain.semantic_map)


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_fixed_size_graph_pads_smaller_images(exported, demo, runtime):
    """Images whose processed size is smaller than the graph's are padded to it, not resized."""
    model, processor = demo
    backend, _ = load_backend(exported, runtime)
    small = random_image(40, 56, seed=5)
    assert backend_input_size(processor, small.shape[:2], do_resize=False, input_size=backend.input_size) == (40, 56)
    (result,) = predict_anomaly(backend, processor, small, do_resize=False)
    assert result.anomaly_map.shape == (40, 56)
    reference = _reference(model, processor, small, (40, 56), EXPORT_SIZE, flip=True)
    np.testing.assert_allclose(result.anomaly_map, reference, atol=MAP_ATOL, rtol=0)


def test_fixed_size_graph_shrinks_larger_images(exported, demo):
    """A portrait image (processed 448x224, taller than the 224x448 graph) is shrunk to the largest size of its
    aspect ratio that fits, 224x112, then padded."""
    model, processor = demo
    backend, _ = load_backend(exported, "onnxruntime")
    portrait = random_image(120, 60, seed=6)
    assert processor.processed_size(portrait.shape[:2]) == (448, 224)
    assert backend_input_size(processor, portrait.shape[:2], input_size=backend.input_size) == (224, 112)
    (result,) = predict_anomaly(backend, processor, portrait)
    assert result.anomaly_map.shape == (120, 60)
    reference = _reference(model, processor, portrait, (224, 112), EXPORT_SIZE, flip=True)
    np.testing.assert_allclose(result.anomaly_map, reference, atol=MAP_ATOL, rtol=0)


def test_fixed_size_graph_refuses_large_images_without_resize(exported, demo, tmp_path, capsys):
    _, processor = demo
    with pytest.raises(ValueError, match=r"an image of 240x300 \(not resized\) is larger than the exported model's "
                                         r"fixed input 224x448; resize it"):
        backend_input_size(processor, (240, 300), do_resize=False, input_size=EXPORT_SIZE)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(random_image(240, 300, seed=7)).save(images / "large.png")
    Image.fromarray(random_image(40, 56, seed=8)).save(images / "small.png")
    out = tmp_path / "out"
    code = main([str(images), "--model", str(exported), "--backend", "onnxruntime", "--no-resize",
                 "--output-dir", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert "large.png: an image of 240x300 (not resized) is larger than the exported model's fixed input" \
        in captured.err
    assert "Traceback" not in captured.err
    assert sorted(p.name for p in out.glob("*_anomaly.npy")) == ["small_anomaly.npy"]


def test_cli_backends_write_the_torch_outputs(exported, tmp_path, capsys):
    outputs = {}
    for backend in ("torch", "onnxruntime", "openvino"):
        out = tmp_path / backend
        model = DEMO if backend == "torch" else exported
        code = main([str(SAMPLES[0]), str(SAMPLES[1]), "--model", str(model), "--backend", backend,
                     "--output-dir", str(out), "--batch-size", "2"])
        assert code == 0, capsys.readouterr().err
        outputs[backend] = [np.load(out / f"{path.stem}_anomaly.npy") for path in SAMPLES[:2]]
    for backend in ("onnxruntime", "openvino"):
        for ref, got in zip(outputs["torch"], outputs[backend]):
            np.testing.assert_allclose(got, ref, atol=MAP_ATOL, rtol=0)


@pytest.mark.parametrize("module,backend,extra", [("onnxruntime", "onnxruntime", "onnx"),
                                                  ("openvino", "openvino", "openvino")])
def test_missing_extra_is_one_line(exported, monkeypatch, capsys, module, backend, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    message = f"{module} is not installed; install the [{extra}] extra: pip install 'mask2anomaly[{extra}]'"
    with pytest.raises(MissingExtraError) as info:
        load_backend(exported, backend)
    assert str(info.value) == message
    assert main([str(SAMPLES[0]), "--model", str(exported), "--backend", backend]) == 2
    assert capsys.readouterr().err.strip() == f"mask2anomaly-predict: {message}"


def test_cli_refuses_what_a_backend_cannot_do(capsys):
    def error(*flags: str) -> str:
        assert main([str(SAMPLES[0]), "--model", str(DEMO), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        return err

    # a PyTorch model folder is not an exported one: say how to make one
    assert f"{DEMO} has no model.onnx" in error("--backend", "onnxruntime")
    assert "mask2anomaly-export" in error("--backend", "openvino")
    assert "--compile is for the torch backend" in error("--backend", "onnxruntime", "--compile")
    with pytest.raises(SystemExit):
        main([str(SAMPLES[0]), "--model", str(DEMO), "--backend", "tensorrt"])
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_api_refuses_mismatched_backend_arguments(exported, demo):
    model, processor = demo
    with pytest.raises(ValueError, match="backend='onnxruntime' runs an exported folder"):
        predict_anomaly(model, processor, _rgb(SAMPLES[0]), backend="onnxruntime")
    backend, _ = load_backend(exported, "onnxruntime")
    with pytest.raises(ValueError, match="backend='openvino' but the model passed is a onnxruntime backend"):
        predict_anomaly(backend, processor, _rgb(SAMPLES[0]), backend="openvino")
    with pytest.raises(ValueError, match="image_processor is needed"):
        predict_anomaly(model, None, _rgb(SAMPLES[0]))
    with pytest.raises(ValueError, match="takes 224x448 inputs only; got pixel_values of 64x64"):
        backend(torch.zeros(1, 3, 64, 64))


def test_compiled_torch_backend_equals_eager(demo):
    """A compiled model (torch.compile: TorchDynamo's graph of the whole forward, AOTAutograd) gives the eager maps.
    The test compiles with the aot_eager backend: inductor's C++ code generation of the same graph takes ~12 minutes
    on the shared 2-core CI machine (benchmarks/bench_backends.py times the inductor form)."""
    model, processor = demo
    image = _rgb(SAMPLES[0])
    (eager,) = predict_anomaly(model, processor, image)
    backend = TorchBackend(model, compile=True, compile_backend="aot_eager")
    (compiled,) = predict_anomaly(backend, processor, image)
    np.testing.assert_allclose(compiled.anomaly_map, eager.anomaly_map, atol=MAP_ATOL, rtol=0)
    assert (compiled.semantic_map == eager.semantic_map).mean() > 0.999
    assert backend._run is not model and backend._run._orig_mod is model


def test_cli_compile_compiles_the_model(monkeypatch, tmp_path, capsys):
    """--compile hands the loaded model to torch.compile (inductor, the default) and predicts through the result."""
    calls = []

    def recording_compile(model, **kwargs):
        calls.append((model, kwargs))
        return model

    monkeypatch.setattr(torch, "compile", recording_compile)
    assert main([str(SAMPLES[0]), "--model", str(DEMO), "--compile", "--no-flip", "--output-dir", str(tmp_path)]) == 0
    assert len(calls) == 1 and calls[0][1] == {"mode": None, "backend": "inductor"}
    assert calls[0][0].config.model_type == "mask2anomaly"
    assert (tmp_path / f"{SAMPLES[0].stem}_anomaly.npy").is_file()


def test_bench_backends_runs_and_prints_ratios():
    """The benchmark script's two tables (tiny config, torch forms only: the ONNX forms need an export per size)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_backends.py"), "--config", "tiny", "--sizes", "64x128",
         "--repeats", "1", "--forms", "stock", "before", "eager", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    tables: dict[str, dict[str, list[str]]] = {}
    for line in done.stdout.splitlines():
        if line.strip() in ("forward:", "end-to-end:"):
            table = tables.setdefault(line.strip()[:-1], {})
        elif line.startswith("  ") and line.split()[0] in ("stock", "before", "eager"):
            table[line.split()[0]] = line.split()
    assert set(tables) == {"forward", "end-to-end"}
    for rows in tables.values():
        assert set(rows) == {"stock", "before", "eager"}
        assert rows["stock"][3] == "1.00" and rows["stock"][6] == "1.000"  # its own ratio, its decoder's ratio
        assert float(rows["before"][4]) > 0 and rows["before"][5].endswith("%")  # the pixel decoder's time, share
    assert tables["forward"]["eager"][7].endswith("%")  # fraction of the matmul peak
    assert tables["end-to-end"]["eager"][-1] == "0.0e+00"  # the reference of the map differences


def test_cli_backend_names_are_the_backends():
    """The light CLI module spells the backend choices out (it must not import torch); they must stay the registry's."""
    from modeling_mask2anomaly.backends import BACKENDS
    from modeling_mask2anomaly.cli import BACKEND_NAMES

    assert BACKEND_NAMES == BACKENDS
