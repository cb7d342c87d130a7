"""Bad configuration values (issue 12): config.json, preprocessor_config.json and detectron2 YAML values that used
to fail deep in torch, convert silently or load and misbehave are refused with one line naming the key, the value
and what is expected; `mask2anomaly-convert --overwrite` replaces only a model folder, atomically."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import yaml
from shared_paths import SHARED_FIXTURES

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation, Mask2AnomalyImageProcessor
from modeling_mask2anomaly.conversion import Detectron2ConfigError, config_from_detectron2_yaml, main
from modeling_mask2anomaly.conversion import writing as writing_module
from modeling_mask2anomaly.conversion.detectron2_config import Detectron2Config, preprocessing_from_detectron2

R50 = SHARED_FIXTURES / "official_r50_small"


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("changes, message", [
    ({"num_queries": 0}, r"num_queries=0; expected a whole number >= 1"),
    ({"num_queries": -5}, r"num_queries=-5; expected a whole number >= 1"),
    ({"hidden_dim": 0}, r"hidden_dim=0; expected a whole number >= 1"),
    ({"num_attention_heads": 5}, r"hidden_dim=32 is not divisible by num_attention_heads=5"),
    ({"num_attention_heads": 0}, r"num_attention_heads=0"),
    ({"feature_size": 48, "mask_feature_size": 48, "num_attention_heads": 4},
     r"feature_size=48; expected a multiple of 32"),
    ({"dropout": 1.5}, r"dropout=1\.5; expected a finite number in \[0\.0, 1\.0\]"),
    ({"contrastive_weight": float("nan")}, r"contrastive_weight=nan; expected a finite number"),
])
def test_model_config_values_are_checked(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message) as error:
        Mask2AnomalyConfig.tiny(**changes)
    _one_line(error)
    # the same values in a config.json
    folder = tmp_path / "model"
    Mask2AnomalyConfig.tiny().save_pretrained(folder)
    values = json.loads((folder / "config.json").read_text())
    values.update(changes)
    (folder / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=message):
        Mask2AnomalyForUniversalSegmentation.from_pretrained(folder)


@pytest.mark.parametrize("key, value, expected", [
    ("flip_tta", "false", "true or false"),
    ("refine", "no", "true or false"),
    ("do_resize", 1, "true or false"),
    ("anomaly_threshold", "high", "a finite number"),
    ("refine_score_threshold", None, None),  # null is the transformers default for an unset value: allowed
    ("refine_score_threshold", "0.9", "a finite number"),
    ("anomaly_threshold", float("inf"), "a finite number"),
    ("outlier_label", 254.5, "a whole number"),
    ("image_std", [0.229, 0.0, 0.225], "positive values"),
    ("image_mean", ["0.485", 0.456, 0.406], "finite numbers"),
])
def test_processor_setting_types_are_checked(tmp_path, key, value, expected):
    folder = tmp_path / "model"
    Mask2AnomalyImageProcessor().save_pretrained(folder)
    path = folder / "preprocessor_config.json"
    values = json.loads(path.read_text())
    values[key] = value
    path.write_text(json.dumps(values))
    if expected is None:
        Mask2AnomalyImageProcessor.from_pretrained(folder)
        return
    shown = f"{key}=" if isinstance(value, list) else f"{key}={value!r} ({type(value).__name__})"  # lists: tuples
    with pytest.raises(ValueError, match=re.escape(shown) + ".*" + re.escape(f"; expected {expected}")) as error:
        Mask2AnomalyImageProcessor.from_pretrained(folder)
    _one_line(error)


def _yaml_with(tmp_path, changes: dict[str, object]):
    values = yaml.safe_load((R50 / "config.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"MODEL.PIXEL_STD": [58.395, 0.0, 57.375]}, r"MODEL\.PIXEL_STD=.*expected 3 positive finite numbers"),
    ({"INPUT.MIN_SIZE_TEST": -1}, r"INPUT\.MIN_SIZE_TEST=-1 .*expected a positive number of pixels"),
    ({"INPUT.MAX_SIZE_TEST": 16}, r"INPUT\.MAX_SIZE_TEST=16 .*expected at least MIN_SIZE_TEST"),
])
def test_detectron2_preprocessing_values_are_checked(tmp_path, changes, message):
    path = _yaml_with(tmp_path, changes)
    with pytest.raises(Detectron2ConfigError, match=message) as error:
        preprocessing_from_detectron2(Detectron2Config.from_file(path))
    _one_line(error)


@pytest.mark.parametrize("changes, message", [
    ({"MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 0}, r"num_queries=0; expected a whole number >= 1"),
    ({"MODEL.MASK_FORMER.NHEADS": 3}, r"is not divisible by num_attention_heads=3"),
    ({"MODEL.MASK_FORMER.HIDDEN_DIM": 0}, r"hidden_dim=0"),
])
def test_detectron2_architecture_values_are_checked(tmp_path, changes, message):
    path = _yaml_with(tmp_path, changes)
    with pytest.raises(Detectron2ConfigError, match=message) as error:
        config_from_detectron2_yaml(path)
    assert str(path) in _one_line(error)


def test_a_deeply_nested_yaml_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("MODEL: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(Detectron2ConfigError, match="more than 32 levels deep") as error:
        config_from_detectron2_yaml(path)
    _one_line(error)
    code = main(["--checkpoint", str(R50 / "checkpoint.pth"), "--config", str(path), "--output-dir",
                 str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "levels deep" in lines[0]
    assert not (tmp_path / "out").exists()


def _convert(out, *extra):
    return main(["--checkpoint", str(R50 / "checkpoint.pth"), "--config", str(R50 / "config.yaml"),
                 "--output-dir", str(out), *extra])


def test_overwrite_replaces_only_a_model_folder(tmp_path, capsys):
    """`--overwrite` on a folder that is not a model folder deleted its contents; now it is refused, one line."""
    precious = tmp_path / "my-photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"irreplaceable")
    (precious / "config.json").write_text('{"camera": "x"}')
    assert _convert(precious, "--overwrite") == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is not a Mask2Anomaly model folder" in lines[0] and "nothing was deleted" in lines[0]
    assert sorted(p.name for p in precious.iterdir()) == ["config.json", "holiday.jpg"]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert _convert(a_file, "--overwrite") == 1 and a_file.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _convert(empty, "--overwrite") == 0 and (empty / "config.json").is_file()
    capsys.readouterr()


def test_overwrite_swaps_atomically(tmp_path, monkeypatch):
    """A kill between "rename the old folder away" and "rename the new one in" left no output folder: the swap
    is one step now, so at every moment the output folder is a complete model folder."""
    out = tmp_path / "model"
    assert _convert(out) == 0
    (out / "marker-of-the-old-folder").write_text("old")
    real_replace = os.replace

    def killed_after_moving_the_output_away(source, destination):
        real_replace(source, destination)
        if os.fspath(source) == os.fspath(out):
            raise KeyboardInterrupt("killed between the two renames")

    monkeypatch.setattr(writing_module.os, "replace", killed_after_moving_the_output_away)
    assert _convert(out, "--overwrite") == 0
    assert (out / "config.json").is_file() and not (out / "marker-of-the-old-folder").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "old folder and staging folder removed"
    shutil.rmtree(out)
