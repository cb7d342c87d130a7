"""Serialisation: config round trip, save/load bit-exactness, remote code loaded where this package is not
importable (a local folder and an offline Hub cache), through every registered Auto class. (What travels, and what it
may import: tests/test_remote_code.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageSegmentation, AutoModelForUniversalSegmentation

from modeling_mask2anomaly import (
    Mask2AnomalyConfig,
    Mask2AnomalyForUniversalSegmentation,
    Mask2AnomalyImageProcessor,
    Mask2AnomalyModel,
)
from modeling_mask2anomaly.configuration_mask2anomaly import LEGACY_PROCESSOR_KEYS

AUTO_CLASSES = ["AutoConfig", "AutoModel", "AutoModelForUniversalSegmentation", "AutoModelForImageSegmentation"]


def test_config_round_trip(tmp_path):
    config = Mask2AnomalyConfig.tiny(contrastive_loss="bce", contrastive_margin=0.5)
    config.save_pretrained(tmp_path)
    loaded = Mask2AnomalyConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "mask2anomaly"
    assert raw["contrastive_loss"] == "bce" and raw["contrastive_margin"] == 0.5
    # post-processing settings are the image processor's (tests/test_settings.py): never in config.json
    assert not set(raw) & set(LEGACY_PROCESSOR_KEYS)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), Mask2AnomalyConfig)


def test_paper_defaults():
    config = Mask2AnomalyConfig()
    assert config.backbone_config.model_type == "resnet" and config.backbone_config.depths == [3, 4, 6, 3]
    assert config.backbone_config.downsample_in_bottleneck is False
    assert (config.num_queries, config.decoder_layers, config.num_labels) == (100, 10, 19)
    assert config.id2label[0] == "road" and config.id2label[18] == "bicycle"
    assert config.global_masked_attention and config.contrastive_loss == "margin"
    processor = Mask2AnomalyImageProcessor.from_model_config(config)  # the owner of the post-processing defaults
    assert processor.refine_class_ids == list(range(2, 11)) and processor.refine_score_threshold == 0.95
    assert processor.outlier_label == 254


def test_invalid_settings_are_named():
    import pytest

    for kwargs, pattern in [
        (dict(contrastive_loss="hinge"), "contrastive_loss='hinge'"),
        (dict(anomaly_scorer="oracle"), "anomaly_scorer='oracle'"),
        (dict(refine_class_ids=[25]), r"refine_class_ids \[25\]"),
    ]:
        with pytest.raises(Exception, match=pattern):
            Mask2AnomalyConfig.tiny(**kwargs)


def _saved_model(tmp_path: Path) -> tuple[Path, torch.Tensor, Mask2AnomalyForUniversalSegmentation]:
    torch.manual_seed(0)
    model = Mask2AnomalyForUniversalSegmentation(Mask2AnomalyConfig.tiny()).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    x = torch.randn(1, 3, 64, 96)
    return folder, x, model


def test_save_load_round_trip_is_bit_exact(tmp_path):
    folder, x, model = _saved_model(tmp_path)
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    for cls in (Mask2AnomalyForUniversalSegmentation, AutoModelForUniversalSegmentation, AutoModelForImageSegmentation):
        loaded = cls.from_pretrained(folder).eval()
        assert type(loaded) is Mask2AnomalyForUniversalSegmentation
        with torch.no_grad():
            a, b = model(x), loaded(x)
        assert torch.equal(a.masks_queries_logits, b.masks_queries_logits)
        assert torch.equal(a.class_queries_logits, b.class_queries_logits)
    base = AutoModel.from_pretrained(folder).eval()
    assert type(base) is Mask2AnomalyModel
    with torch.no_grad():
        assert torch.equal(base(x).transformer_decoder_last_hidden_state, model.model(x).transformer_decoder_last_hidden_state)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    # this project must not be importable: everything has to come from the folder's remote code
    for name in ("modeling_mask2anomaly", "mask2anomaly_training", "mask2anomaly_eval"):
        sys.modules[name] = None
    import torch, transformers
    source, x_path, out_path = sys.argv[1:4]
    x = torch.load(x_path)
    results = {}
    for name in %r:
        cls = getattr(transformers, name)
        obj = cls.from_pretrained(source, trust_remote_code=True)
        results[name] = type(obj).__module__.startswith("transformers_modules")
        if name == "AutoConfig":
            continue
        with torch.no_grad():
            out = obj.eval()(x)
        key = "transformer_decoder_last_hidden_state" if name == "AutoModel" else "masks_queries_logits"
        torch.save(getattr(out, key), out_path + "." + name)
    print(results)
    assert all(results.values()), results
    """
    % (AUTO_CLASSES,)
)


def _run_remote(source: str, x: torch.Tensor, tmp_path: Path, env_extra: dict[str, str]) -> None:
    x_path = tmp_path / "x.pt"
    torch.save(x, x_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}, **env_extra)
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, source, str(x_path), str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _check_remote_outputs(tmp_path: Path, x: torch.Tensor, model) -> None:
    with torch.no_grad():
        full, base = model(x).masks_queries_logits, model.model(x).transformer_decoder_last_hidden_state
    for name in AUTO_CLASSES[1:]:
        expected = base if name == "AutoModel" else full
        assert torch.equal(torch.load(tmp_path / f"out.{name}"), expected), name


def test_remote_code_from_a_local_folder_without_the_package(tmp_path):
    folder, x, model = _saved_model(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert set(AUTO_CLASSES) <= set(config["auto_map"])
    for name in ("configuration_mask2anomaly.py", "modeling_mask2anomaly.py"):
        assert (folder / name).exists()
    _run_remote(str(folder), x, tmp_path, {})
    _check_remote_outputs(tmp_path, x, model)


def test_remote_code_from_an_offline_hub_cache(tmp_path):
    """The Hub cache layout (models--org--name/snapshots/<rev>, refs/main) read with HF_HUB_OFFLINE=1."""
    folder, x, model = _saved_model(tmp_path)
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--mask2anomaly-tiny"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    _run_remote("someone/mask2anomaly-tiny", x, tmp_path, {"HF_HUB_CACHE": str(tmp_path / "hub")})
    _check_remote_outputs(tmp_path, x, model)

