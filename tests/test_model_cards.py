"""Model card generator (parsed back with huggingface_hub, model-index round trip) and `mask2anomaly-publish`
(dry-run folder contents, refusal of pickle files, the upload call with the Hub API mocked at its boundary)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

from mask2anomaly_model_cards.card import write_model_card
from mask2anomaly_model_cards.publish import main as publish_main
import modeling_mask2anomaly
from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation, Mask2AnomalyImageProcessor

PACKAGE_DIR = Path(modeling_mask2anomaly.__file__).parent  # where the installed package keeps handler.py
RESULT = {
    "model": "runs/tiny", "benchmark": "smiyc_ra21", "benchmark_name": "SMIYC RoadAnomaly21 (validation)",
    "mode": "exact", "num_images": 10, "num_items": 10,
    "options": {"flip_tta": True, "refine": True, "scorer": "mask2anomaly"},
    "metrics": {"auprc": 0.887123, "fpr95": 0.14567, "auroc": 0.9712, "siou": 0.4321, "ppv": None, "mean_f1": 0.25},
}
RESULT_OBSTACLE = {**RESULT, "benchmark": "smiyc_ro21", "benchmark_name": "SMIYC RoadObstacle21 (validation)",
                   "metrics": {"auprc": 0.5, "fpr95": 0.002, "auroc": 0.99}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cards") / "tiny-model"
    torch.manual_seed(0)
    Mask2AnomalyForUniversalSegmentation(Mask2AnomalyConfig.tiny()).save_pretrained(folder)
    Mask2AnomalyImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(folder)
    return folder


def test_card_parses_with_hub_metadata_and_model_index(model_dir, tmp_path):
    results_file = tmp_path / "ra21.json"
    results_file.write_text(json.dumps(RESULT))
    path = write_model_card(model_dir, [results_file, RESULT_OBSTACLE], datasets=["cityscapes"],
                            repo_id="org/tiny", widget=[{"src": "https://example.org/a.png", "example_title": "a"}])
    card = ModelCard.load(path)
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-segmentation"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["cityscapes"]
    assert {"anomaly-segmentation", "road-scene", "mask2former", "mask2anomaly"} <= set(meta["tags"])
    assert meta["widget"] == [{"src": "https://example.org/a.png", "example_title": "a"}]

    name, entries = model_index_to_eval_results(meta["model-index"])
    assert name == "tiny"
    values = {(e.dataset_type, e.metric_type): e.metric_value for e in entries}
    expected = {
        ("smiyc_ra21", "auprc"): 88.71, ("smiyc_ra21", "fpr95"): 14.57, ("smiyc_ra21", "roc_auc"): 97.12,
        ("smiyc_ra21", "siou"): 43.21, ("smiyc_ra21", "mean_f1"): 25.0,
        ("smiyc_ro21", "auprc"): 50.0, ("smiyc_ro21", "fpr95"): 0.2, ("smiyc_ro21", "roc_auc"): 99.0,
    }
    assert values == pytest.approx(expected)  # ppv None: undefined, so no entry
    assert all(e.task_type == "image-segmentation" for e in entries)
    # the metadata survives a ModelCardData round trip (which raises on an invalid model-index)
    again = ModelCardData(**meta)
    assert len(again.eval_results) == len(entries) and again.model_name == "tiny"

    text = card.text
    for needle in ("trust_remote_code=True", 'pipeline("image-segmentation"', "mask2anomaly-predict",
                   "@InProceedings{Rai_2023_ICCV", "88.7 / 14.6", "hinge never clips",
                   "| SMIYC RoadAnomaly21 (validation) | 10 | exact | 88.71 | 14.57 | 97.12 | 43.21 | – | 25.00 |"):
        assert needle in text, needle


def test_card_training_recipe_and_bad_results(model_dir, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for path in model_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    record = {"command": "mask2anomaly-train --config synthroad --stage 2", "stage": 2, "max_steps": 300,
              "config": {"stage2": {"learning_rate": 1.0e-5, "batch_size": 8}, "data": {"outlier_probability": 0.2}}}
    (folder / "training_config.yaml").write_text(yaml.safe_dump(record))
    text = ModelCard.load(write_model_card(folder)).text
    assert "mask2anomaly-train --config synthroad --stage 2" in text and "| learning_rate | `1e-05` |" in text
    assert "has not been evaluated yet" in text
    (tmp_path / "percent.json").write_text(json.dumps({**RESULT, "metrics": {"auprc": 88.7, "fpr95": 14.6}}))
    with pytest.raises(ValueError, match=r"percent\.json.*auprc.*expected a fraction"):
        write_model_card(folder, [tmp_path / "percent.json"])


def _remote_modules(folder: Path) -> set[str]:
    """Modules the folder's configs name and those files import relatively, found here by plain text search."""
    names = set()
    for config in ("config.json", "preprocessor_config.json"):
        data = json.loads((folder / config).read_text())
        names |= {v.split(".")[0] for v in data.get("auto_map", {}).values()}
        names |= {p["impl"].split(".")[0] for p in data.get("custom_pipelines", {}).values()}
    pending = list(names)
    while pending:
        text = (folder / f"{pending.pop()}.py").read_text()
        for module in re.findall(r"^from \.(\w+) import", text, flags=re.M):
            if module not in names:
                names.add(module)
                pending.append(module)
    return names


def test_publish_dry_run_writes_a_complete_safe_folder(model_dir, tmp_path):
    results = tmp_path / "ra21.json"
    results.write_text(json.dumps(RESULT))
    out = tmp_path / "hub"
    assert publish_main([str(model_dir), "--repo-id", "org/tiny", "--results", str(results), "--dry-run",
                         "--output-dir", str(out)]) == 0
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "preprocessor_config.json", "model.safetensors", "handler.py", "requirements.txt",
            "README.md"} <= files
    assert not [f for f in files if Path(f).suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}]
    assert {f"{m}.py" for m in _remote_modules(out)} <= files
    assert {"configuration_mask2anomaly.py", "modeling_mask2anomaly.py", "image_processing_mask2anomaly.py"} <= files
    assert (out / "handler.py").read_bytes() == (PACKAGE_DIR / "handler.py").read_bytes()
    assert "transformers" in (out / "requirements.txt").read_text()
    examples = sorted(f for f in files if f.startswith("examples/"))
    assert examples
    card = ModelCard.load(out / "README.md")
    sources = [w["src"] for w in card.data.to_dict()["widget"]]
    assert sources == [f"https://huggingface.co/org/tiny/resolve/main/{e}" for e in examples]
    _, entries = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert {e.metric_type: e.metric_value for e in entries}["auprc"] == pytest.approx(88.71)
    # a pickle file in the model folder is refused, naming it
    (model_dir / "pytorch_model.bin").write_bytes(b"pickle")
    try:
        assert publish_main([str(model_dir), "--repo-id", "org/tiny", "--dry-run", "--output-dir",
                             str(tmp_path / "refused")]) == 1
    finally:
        (model_dir / "pytorch_model.bin").unlink()
    assert not (tmp_path / "refused").exists()


def test_publish_uploads_the_checked_folder(model_dir, tmp_path, monkeypatch):
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls.append(("upload_folder", repo_id, {p.name for p in folder.rglob("*") if p.is_file()}))
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    widget = tmp_path / "street.png"
    from PIL import Image
    Image.new("RGB", (96, 64), (90, 90, 90)).save(widget)
    assert publish_main([str(model_dir), "--repo-id", "org/tiny-private", "--private", "--widget-image",
                         str(widget)]) == 0
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == "org/tiny-private" and calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert calls[1][1] == "org/tiny-private"
    uploaded = calls[1][2]
    assert {"model.safetensors", "config.json", "handler.py", "README.md", "street.png",
            "modeling_mask2anomaly.py"} <= uploaded
