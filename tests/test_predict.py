"""`mask2anomaly-predict` end to end on a temporary folder: good images of every awkward kind, bad files, the
flags against maps computed here from the model outputs, the pictures, and atomic writing."""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TEST_SIZE, model_outputs, random_image, reference_class_scores, save_tiny_model, tiny_model

from modeling_mask2anomaly import (
    CITYSCAPES_CLASSES,
    Mask2AnomalyForUniversalSegmentation,
    Mask2AnomalyImageProcessor,
    predict_anomaly,
)
from modeling_mask2anomaly import predict as predict_module
from modeling_mask2anomaly.predict import main
from modeling_mask2anomaly.visualize import INFERNO_LUT

pytestmark = pytest.mark.usefixtures("single_thread")

GOOD = {  # name -> (height, width) of the outputs
    "rgb.png": (40, 56),
    "gray.png": (30, 44),
    "rgba.png": (33, 47),
    "palette.png": (36, 36),
    "deep.png": (28, 50),
    "cmyk.jpg": (34, 40),
    "rotated.jpg": (40, 24),  # stored 24 x 40 with EXIF orientation 6: displayed 40 high, 24 wide
    "tiny.png": (10, 12),  # smaller than the network stride
}
BAD = {"empty.png": "empty", "truncated.png": "truncated", "text.png": "not an image"}


def _write_inputs(folder: Path) -> None:
    folder.mkdir()
    Image.fromarray(random_image(40, 56, seed=1)).save(folder / "rgb.png")
    Image.fromarray(random_image(30, 44, seed=2)[..., 0]).save(folder / "gray.png")
    rgba = np.dstack([random_image(33, 47, seed=3), np.full((33, 47), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(random_image(36, 36, seed=4)).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    deep = np.random.default_rng(5).integers(0, 65536, size=(28, 50)).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")  # mode I;16
    Image.fromarray(random_image(34, 40, seed=6)).convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(random_image(24, 40, seed=7)).save(folder / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray(random_image(10, 12, seed=8)).save(folder / "tiny.png")
    (folder / "empty.png").write_bytes(b"")
    encoded = io.BytesIO()
    Image.fromarray(random_image(40, 40, seed=9)).save(encoded, format="PNG")
    (folder / "truncated.png").write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    (folder / "text.png").write_text("this is not an image\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("predict")
    folder = save_tiny_model(root / "model", "refining")
    _write_inputs(root / "images")
    model = Mask2AnomalyForUniversalSegmentation.from_pretrained(folder).eval()
    processor = Mask2AnomalyImageProcessor.from_pretrained(folder)
    return {"root": root, "model_dir": folder, "images": root / "images", "model": model, "processor": processor}


def _manual_anomaly(ws: dict, rgb: np.ndarray, flip: bool, refine: bool, resize: bool = True) -> np.ndarray:
    """Anomaly map post-processed here from model outputs of the image (and of its flipped copy)."""
    model, processor = ws["model"], ws["processor"]
    size = [rgb.shape[:2]]

    def single(image: np.ndarray) -> torch.Tensor:
        outputs, processed = model_outputs(model, processor, image, do_resize=resize)
        return processor.post_process_anomaly_segmentation(outputs, size, refine=refine, image_sizes=[processed])[0]

    plain = single(rgb)
    if not flip:
        return plain.numpy()
    return ((plain + single(np.ascontiguousarray(rgb[:, ::-1])).flip(-1)) / 2).numpy()


def _run(ws: dict, out: Path, *args: str, inputs: list[str] | None = None, capsys=None) -> tuple[int, str, str]:
    code = main([*(inputs or [str(ws["images"] / "rgb.png")]), "--model", str(ws["model_dir"]),
                 "--output-dir", str(out), "--device", "cpu", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_good_and_bad_files(workspace, tmp_path, capsys):
    ws = workspace
    out = tmp_path / "out"
    code, stdout, stderr = _run(ws, out, "--batch-size", "3", inputs=[str(ws["images"])], capsys=capsys)
    assert code == 1  # bad files make the run fail, after the good ones are done

    for name, reason in BAD.items():
        lines = [line for line in stderr.splitlines() if line.startswith("error:") and name in line]
        assert len(lines) == 1, f"expected one error line for {name}:\n{stderr}"
        assert reason in lines[0]
    names = sorted(p.name for p in out.iterdir())
    expected = sorted(f"{Path(n).stem}{suffix}" for n in GOOD for suffix in predict_module.OUTPUT_SUFFIXES)
    assert names == expected, "outputs for every good file and nothing else (no temporary or partial files)"

    for name, (height, width) in GOOD.items():
        stem = Path(name).stem
        anomaly = np.load(out / f"{stem}_anomaly.npy")
        assert anomaly.dtype == np.float32 and anomaly.shape == (height, width), name
        semantic = Image.open(out / f"{stem}_semantic.png")
        assert semantic.mode == "P" and semantic.size == (width, height), name
        line = next(line for line in stdout.splitlines() if line.startswith(str(ws["images"] / name)))
        assert f"{width}x{height}" in line
        assert f"max score {anomaly.max():.3f}" in line
        assert f"anomalous area {100 * (anomaly > 0.5).mean():.2f}%" in line

    # the rotated JPEG: predicted on the stored pixels turned 90 degrees clockwise, here by hand
    stored = np.asarray(Image.open(ws["images"] / "rotated.jpg").convert("RGB"))
    upright = np.ascontiguousarray(np.rot90(stored, k=-1))
    expected_map = _manual_anomaly(ws, upright, flip=True, refine=True)
    np.testing.assert_allclose(np.load(out / "rotated_anomaly.npy"), expected_map, atol=1e-5)


def test_flags_against_manual_post_processing(workspace, tmp_path, capsys):
    ws = workspace
    rgb = np.asarray(Image.open(ws["images"] / "rgb.png").convert("RGB"))
    maps = {}
    for flags in [(), ("--no-flip",), ("--no-refine",), ("--no-resize",), ("--no-flip", "--no-refine")]:
        out = tmp_path / ("_".join(flags) or "default")
        code, _, stderr = _run(ws, out, *flags, capsys=capsys)
        assert code == 0, stderr
        maps[flags] = np.load(out / "rgb_anomaly.npy")

    expected = {
        (): _manual_anomaly(ws, rgb, flip=True, refine=True),
        ("--no-flip",): _manual_anomaly(ws, rgb, flip=False, refine=True),
        ("--no-refine",): _manual_anomaly(ws, rgb, flip=True, refine=False),
        ("--no-resize",): _manual_anomaly(ws, rgb, flip=True, refine=True, resize=False),
        ("--no-flip", "--no-refine"): _manual_anomaly(ws, rgb, flip=False, refine=False),
    }
    for flags, reference in expected.items():
        np.testing.assert_allclose(maps[flags], reference, atol=1e-5, err_msg=str(flags))
    # each flag must really change the map, or the comparisons above prove nothing
    for flags in expected:
        if flags:
            assert np.abs(maps[flags] - maps[()]).max() > 1e-3, f"{flags} changed nothing"
    # refinement zeroes pixels: some are exactly 0 with it and none need be without it
    assert (maps[()] == 0).sum() > (maps[("--no-refine",)] == 0).sum()


def test_pictures(workspace, tmp_path, capsys):
    ws = workspace
    out = tmp_path / "out"
    code, _, stderr = _run(ws, out, "--no-flip", capsys=capsys)
    assert code == 0, stderr
    heatmap = Image.open(out / "rgb_heatmap.png")
    assert heatmap.mode == "RGB"
    # a 40 x 56 image is enlarged 5x for display (longer side >= 256); the colour bar panel sits to its right
    assert heatmap.height == 200 and heatmap.width > 280
    panel = np.asarray(heatmap)[:, 280:].reshape(-1, 3).astype(int)
    top_colour, bottom_colour = INFERNO_LUT[-1].astype(int), INFERNO_LUT[0].astype(int)
    rows = np.arange(heatmap.height).repeat(heatmap.width - 280)
    near = lambda colour: np.abs(panel - colour).sum(axis=1) <= 6  # noqa: E731
    assert near(top_colour).any() and near(bottom_colour).any(), "the colour bar shows both ends of the colour map"
    assert rows[near(top_colour)].mean() < rows[near(bottom_colour)].mean(), "high scores at the top of the bar"
    dark_text = (panel.sum(axis=1) < 60) & ~near(bottom_colour)
    assert dark_text.sum() > 20, "tick labels drawn beside the bar"
    overlay = np.asarray(heatmap)[:, :280]
    assert not np.array_equal(overlay[::5, ::5], np.asarray(Image.open(ws["images"] / "rgb.png")))

    semantic = Image.open(out / "rgb_semantic.png")
    palette = semantic.getpalette()[: 3 * 19]
    assert palette[0:3] == [128, 64, 128] and palette[3 * 10:3 * 11] == [70, 130, 180]  # road, sky
    assert palette[3 * 13:3 * 14] == [0, 0, 142]  # car
    rgb = np.asarray(Image.open(ws["images"] / "rgb.png").convert("RGB"))
    outputs, processed = model_outputs(ws["model"], ws["processor"], rgb)
    reference = reference_class_scores(outputs, processed, rgb.shape[:2]).argmax(0).numpy()
    assert reference.max() < len(CITYSCAPES_CLASSES)
    assert (np.asarray(semantic) != reference).mean() < 0.002


def test_failed_write_leaves_no_file(workspace, tmp_path, capsys, monkeypatch):
    ws = workspace

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(predict_module, "render_semantic", broken)
    out = tmp_path / "out"
    code, stdout, stderr = _run(ws, out, "--no-flip", capsys=capsys)
    assert code == 1
    assert re.search(r"error: .*rgb\.png.*disk full \(simulated\)", stderr)
    assert list(out.iterdir()) == [], "neither the finished outputs of the image nor temporary files stay"
    assert stdout == ""


def test_inputs_globs_and_missing(workspace, tmp_path, capsys):
    ws = workspace
    out = tmp_path / "out"
    pattern = str(ws["images"] / "r*.png")  # rgb.png and rgba.png
    code, stdout, stderr = _run(ws, out, "--no-flip", inputs=[pattern, str(ws["images"] / "rgb.png"),
                                                              str(tmp_path / "missing.png")], capsys=capsys)
    assert code == 1
    assert "missing.png: no such file or folder" in stderr
    assert len(stdout.splitlines()) == 2, "rgb.png named twice is predicted once"
    assert sorted(p.name for p in out.glob("*_anomaly.npy")) == ["rgb_anomaly.npy", "rgba_anomaly.npy"]
    assert main([pattern, "--model", str(ws["model_dir"]), "--output-dir", str(out), "--batch-size", "0"]) == 2


def test_bfloat16_model():
    model = tiny_model("random")  # moderate logits: bfloat16 rounding moves its maps by ~1e-3
    processor = Mask2AnomalyImageProcessor.from_model_config(model.config, size=dict(TEST_SIZE))
    rgb = random_image(40, 56, seed=1)
    outputs, processed = model_outputs(model, processor, rgb)  # the float32 model
    scores = reference_class_scores(outputs, processed, rgb.shape[:2])
    reference = (1 - scores.max(dim=0).values).numpy()

    half = copy.deepcopy(model).to(torch.bfloat16)
    (result,) = predict_anomaly(half, processor, [rgb], flip_tta=False, refine=False)
    assert result.anomaly_map.dtype == np.float32 and result.anomaly_map.shape == rgb.shape[:2]
    difference = np.abs(result.anomaly_map - reference)
    assert 0 < difference.max() < 0.03, "bfloat16 rounding only (and the model really ran in bfloat16)"
    assert (result.semantic_map == scores.argmax(dim=0).numpy()).mean() > 0.95
    assert next(half.parameters()).dtype == torch.bfloat16


def test_cli_dtype(workspace, tmp_path, capsys):
    """--dtype casts the weights (load_model_and_processor); reduced precision on the CPU is refused with the reason, nothing
    written (torch's CPU grid_sample gives wrong bfloat16 values for the pixel decoder's strided inputs)."""
    model, _ = predict_module.load_model_and_processor(str(workspace["model_dir"]), torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = tmp_path / "out"
    code, _, stderr = _run(workspace, out, "--dtype", "bfloat16", capsys=capsys)
    assert code == 2
    assert "--dtype bfloat16 needs a GPU" in stderr and "grid_sample" in stderr and "Traceback" not in stderr
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(SystemExit):
        main([str(workspace["images"] / "rgb.png"), "--model", str(workspace["model_dir"]), "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_no_resize_leaves_the_processor_alone(workspace, tmp_path, capsys, monkeypatch):
    ws = workspace
    processor = copy.deepcopy(ws["processor"])
    monkeypatch.setattr(predict_module, "load_model_and_processor", lambda name, device, dtype: (ws["model"], processor))
    code, _, stderr = _run(ws, tmp_path / "out", "--no-resize", "--no-flip", capsys=capsys)
    assert code == 0, stderr
    assert processor.do_resize is True
    rgb = np.asarray(Image.open(ws["images"] / "rgb.png").convert("RGB"))
    np.testing.assert_allclose(np.load(tmp_path / "out" / "rgb_anomaly.npy"),
                               _manual_anomaly(ws, rgb, flip=False, refine=True, resize=False), atol=1e-5)


def test_flags_share_the_settings_names(workspace, tmp_path, capsys):
    """--anomaly-scorer / --anomaly-threshold, named as the processor settings, and their aliases --scorer /
    --threshold give the same outputs."""
    outputs = {}
    for flags in (("--anomaly-scorer", "msp", "--anomaly-threshold", "0.25"), ("--scorer", "msp", "--threshold", "0.25")):
        out = tmp_path / flags[0].strip("-")
        code, stdout, stderr = _run(workspace, out, "--no-flip", *flags, capsys=capsys)
        assert code == 0, stderr
        assert "(score > 0.25)" in stdout
        outputs[flags[0]] = np.load(out / "rgb_anomaly.npy")
    np.testing.assert_array_equal(outputs["--anomaly-scorer"], outputs["--scorer"])
    default = tmp_path / "default"
    assert _run(workspace, default, "--no-flip", capsys=capsys)[0] == 0
    assert not np.array_equal(np.load(default / "rgb_anomaly.npy"), outputs["--scorer"]), "msp is not the default"

