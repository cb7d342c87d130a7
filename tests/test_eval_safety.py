"""`mask2anomaly-eval` against hostile folders and faults (issue 12): the output folder is checked before the
evaluation, an image without a label is reported, a bad label is reported under its own path, and a label PNG whose
header announces a huge image is refused before it is decoded while the run goes on with the rest."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hostile_files import truncate
from PIL import Image
from tiny_models import synthroad_eval_setup

from mask2anomaly_eval import run as run_module
from mask2anomaly_eval.run import main

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_IMAGES = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-safety")
    data = synthroad_eval_setup(root, NUM_IMAGES)[0]
    return root, data


def _args(root: Path, data: Path, out: Path) -> list[str]:
    return ["--model", str(root / "model"), "--benchmark", "synthroad", "--data-dir", str(data),
            "--output-dir", str(out), "--no-flip"]


def _copy(data: Path, folder: Path) -> Path:
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True)
        for path in (data / sub).glob("*.png"):
            (folder / sub / path.name).write_bytes(path.read_bytes())
    return folder


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header announces width x height grey pixels, with a tiny (truncated) data chunk: what a small
    hostile file looks like before decoding."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * 1000)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_output_folder_is_checked_before_evaluating(setup, tmp_path, capsys, monkeypatch):
    root, data = setup
    evaluated = []
    monkeypatch.setattr(run_module, "evaluate_scorers", lambda *args, **kwargs: evaluated.append(args))
    a_file = tmp_path / "a-file"
    a_file.write_text("results go elsewhere")
    for out, message in ((a_file, "is a file; expected a folder"), (a_file / "sub", "cannot write into")):
        assert main(_args(root, data, out)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mask2anomaly-eval: --output-dir:") and message in lines[0]
    assert evaluated == [] and a_file.read_text() == "results go elsewhere"


def test_results_are_printed_when_they_cannot_be_written(setup, tmp_path, capsys, monkeypatch):
    root, data = setup

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_module, "write_results", full_disk)
    assert main(_args(root, data, tmp_path / "out")) == 1
    captured = capsys.readouterr()
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["num_images"] == NUM_IMAGES and 0 <= record["metrics"]["auprc"] <= 1
    assert "No space left on device" in captured.err


def test_bad_labels_are_reported_under_their_path_and_the_rest_evaluated(setup, tmp_path, capsys):
    root, data = setup
    bad = _copy(data, tmp_path / "data")
    names = sorted(p.name for p in (bad / "labels").glob("*.png"))
    # an image without a label, a truncated label, a label whose header says 20000x20000
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(bad / "images" / "unlabelled.png")
    truncate(bad / "labels" / names[0], 0.5)
    _png_header_only(bad / "labels" / names[1], 20000, 20000)
    out = tmp_path / "out"
    code = main(_args(root, bad, out))
    stderr = capsys.readouterr().err
    assert code == 1
    record = json.loads((out / "synthroad.json").read_text())
    assert record["num_images"] == NUM_IMAGES - 2 and record["unlabelled"] == [str(bad / "images" / "unlabelled.png")]
    assert "1 image(s) without a label file left out" in stderr and "unlabelled.png" in stderr
    failures = {Path(failure["label"]).name: failure["error"] for failure in record["failures"]}
    assert set(failures) == {names[0], names[1]}
    assert failures[names[0]].startswith(f"cannot read label image {bad / 'labels' / names[0]}")
    assert "above the pixel limit" in failures[names[1]] and "400000000 pixels" in failures[names[1]]
    assert str(bad / "labels" / names[1]) in failures[names[1]]


def test_a_label_above_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    """Between PIL's warning and error thresholds PIL only warns: the label reader refuses it all the same."""
    from mask2anomaly_eval.io import read_label_png

    path = tmp_path / "label.png"
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    limit = r"label\.png is above the pixel limit PIL\.Image\.MAX_IMAGE_PIXELS = 1000.*1200 pixels"
    with pytest.raises(ValueError, match=limit):
        read_label_png(path)
