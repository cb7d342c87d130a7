"""One owner per setting: the image processor owns post-processing settings and `outlier_label`, the config the
network. The legacy rule for older config.json files that still carry processor keys: the config checks them,
drops them with one warning and keeps them in `legacy_postprocessing` (never saved); `from_model_config` uses
them, and `load_model_and_processor` uses them only for keys that preprocessor_config.json lacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from modeling_mask2anomaly import (
    OUTLIER_LABEL,
    Mask2AnomalyConfig,
    Mask2AnomalyForUniversalSegmentation,
    Mask2AnomalyImageProcessor,
    load_model_and_processor,
)
from modeling_mask2anomaly.configuration_mask2anomaly import LEGACY_PROCESSOR_KEYS

DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo_model"

# what an older config.json carried, with values that differ from the processor's defaults
LEGACY = {"refine": False, "refine_score_threshold": 0.9, "refine_class_ids": [3, 4], "anomaly_scorer": "rba",
          "flip_tta": False, "anomaly_threshold": 0.25, "outlier_label": 200}


def _config_logger():
    return logging.get_logger("modeling_mask2anomaly.configuration_mask2anomaly")


def test_config_describes_the_network_only():
    config = Mask2AnomalyConfig.tiny()
    assert not [key for key in LEGACY_PROCESSOR_KEYS if hasattr(config, key)]
    assert config.legacy_postprocessing == {}
    processor = Mask2AnomalyImageProcessor()
    assert processor.outlier_label == OUTLIER_LABEL == 254
    assert (processor.refine, processor.anomaly_scorer, processor.anomaly_threshold, processor.flip_tta) == (
        True, "mask2anomaly", 0.5, True)


def test_legacy_keys_are_dropped_with_one_warning_and_never_saved(tmp_path):
    logger = _config_logger()
    logger.warning_once.cache_clear()
    with CaptureLogger(logger) as captured:
        config = Mask2AnomalyConfig.tiny(**LEGACY)
        Mask2AnomalyConfig.tiny(**LEGACY)
    assert captured.out.count("image-processor settings") == 1, captured.out
    assert "anomaly_scorer" in captured.out and "preprocessor_config.json" in captured.out
    assert config.legacy_postprocessing == LEGACY
    assert not [key for key in LEGACY_PROCESSOR_KEYS if hasattr(config, key)]
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert not set(raw) & set(LEGACY_PROCESSOR_KEYS) and "legacy_postprocessing" not in raw


@pytest.mark.parametrize("bad, pattern", [
    (dict(anomaly_scorer="oracle"), "anomaly_scorer='oracle' is not one of mask2anomaly"),
    (dict(refine_class_ids=[25]), r"refine_class_ids \[25\] are outside the 19 classes"),
])
def test_bad_legacy_values_are_named(bad, pattern):
    with pytest.raises(Exception, match=pattern):  # huggingface_hub's strict validation wraps the ValueError
        Mask2AnomalyConfig.tiny(**bad)


def test_from_model_config_takes_the_legacy_values():
    processor = Mask2AnomalyImageProcessor.from_model_config(Mask2AnomalyConfig.tiny(**LEGACY), flip_tta=True)
    assert (processor.refine, processor.refine_score_threshold, processor.refine_class_ids) == (False, 0.9, [3, 4])
    assert (processor.anomaly_scorer, processor.anomaly_threshold, processor.outlier_label) == ("rba", 0.25, 200)
    assert processor.flip_tta is True, "keyword arguments override the legacy values"


def _legacy_folder(tmp_path: Path, processor_settings: dict | None) -> Path:
    """A saved tiny model whose config.json carries LEGACY (as older code wrote it), with a processor file holding
    `processor_settings` only (None: no preprocessor_config.json)."""
    folder = tmp_path / "model"
    Mask2AnomalyForUniversalSegmentation(Mask2AnomalyConfig.tiny()).save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **LEGACY}))
    if processor_settings is not None:
        Mask2AnomalyImageProcessor().save_pretrained(folder)
        saved = json.loads((folder / "preprocessor_config.json").read_text())
        saved = {k: v for k, v in saved.items() if k not in LEGACY_PROCESSOR_KEYS} | processor_settings
        (folder / "preprocessor_config.json").write_text(json.dumps(saved))
    return folder


def test_loading_a_folder_prefers_the_processor_file(tmp_path):
    folder = _legacy_folder(tmp_path, {"anomaly_scorer": "msp", "refine": True, "outlier_label": 254})
    model, processor = load_model_and_processor(folder)
    assert model.config.legacy_postprocessing == LEGACY
    # in preprocessor_config.json: the file wins
    assert (processor.anomaly_scorer, processor.refine, processor.outlier_label) == ("msp", True, 254)
    # absent from it: the legacy config values fill in
    assert (processor.flip_tta, processor.anomaly_threshold, processor.refine_class_ids) == (False, 0.25, [3, 4])
    assert processor.refine_score_threshold == 0.9


def test_loading_a_folder_without_processor_file_uses_the_legacy_values(tmp_path):
    _, processor = load_model_and_processor(_legacy_folder(tmp_path, None))
    assert (processor.anomaly_scorer, processor.refine, processor.flip_tta) == ("rba", False, False)


def test_a_resaved_folder_holds_each_setting_in_one_file(tmp_path):
    model, processor = load_model_and_processor(_legacy_folder(tmp_path, {"anomaly_scorer": "msp"}))
    out = tmp_path / "resaved"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert not set(config) & set(LEGACY_PROCESSOR_KEYS)
    assert set(LEGACY_PROCESSOR_KEYS) <= set(saved)
    assert (saved["anomaly_scorer"], saved["flip_tta"], saved["outlier_label"]) == ("msp", False, 200)
    _, again = load_model_and_processor(out)
    assert again.to_dict() == processor.to_dict()


def test_demo_model_keeps_loading():
    """demo_model/config.json still carries the legacy keys; its preprocessor_config.json holds every setting."""
    model, processor = load_model_and_processor(DEMO_MODEL)
    saved = json.loads((DEMO_MODEL / "preprocessor_config.json").read_text())
    for key in LEGACY_PROCESSOR_KEYS:
        if key in saved:
            assert getattr(processor, key) == saved[key], key
    assert next(model.parameters()).dtype == torch.float32 and not model.training
