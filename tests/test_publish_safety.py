"""`mask2anomaly-publish` against bad model folders and faults (issue 12 item 17): bad `custom_pipelines` and a disk
that fills up are the command's own one-line error, and leave no folder behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from mask2anomaly_model_cards import publish as publish_module
from mask2anomaly_model_cards.publish import main as publish_main


def _widget(tmp_path: Path) -> Path:
    path = tmp_path / "road.png"
    Image.new("RGB", (96, 64), (90, 90, 90)).save(path)
    return path


def _publish(folder: Path, out: Path, widget: Path, capsys) -> tuple[int, str]:
    code = publish_main([str(folder), "--repo-id", "org/tiny", "--dry-run", "--output-dir", str(out),
                         "--widget-image", str(widget)])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("pipelines", [
    "image-segmentation",
    [{"impl": "pipeline_mask2anomaly.Mask2AnomalyPipeline"}],
    {"image-segmentation": "pipeline_mask2anomaly.Mask2AnomalyPipeline"},
    {"image-segmentation": {"impl": 3}},
    {"image-segmentation": {"impl": "/etc/evil.Pipeline"}},
    {"image-segmentation": {"impl": "../outside.Pipeline"}},
])
def test_bad_custom_pipelines_is_one_line(tiny_model_dir, tmp_path, capsys, pipelines):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["custom_pipelines"] = pipelines
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "hub"
    code, err = _publish(folder, out, _widget(tmp_path), capsys)
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("mask2anomaly-publish: ") and ("custom_pipelines" in err or "config.json" in err), err
    assert not out.exists()


def test_a_full_disk_is_one_line_and_leaves_no_folder(tiny_model_dir, tmp_path, capsys, monkeypatch):
    widget = _widget(tmp_path)
    real_copy = shutil.copyfile

    def copy_until_full(source, destination, *args, **kwargs):
        if Path(source).suffix == ".safetensors":
            raise OSError(28, "No space left on device", str(destination))
        return real_copy(source, destination, *args, **kwargs)

    monkeypatch.setattr(publish_module.shutil, "copyfile", copy_until_full)
    out = tmp_path / "hub"
    code, err = _publish(tiny_model_dir, out, widget, capsys)
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and str(out) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["road.png"], "no scratch folder left"
