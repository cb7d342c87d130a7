"""Model card generator (parsed back with huggingface_hub, model-index round trip) and `mask2anomaly-publish`
(dry-run folder contents, refusal of pickle files, the upload call with the Hub API mocked at its boundary)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

import modeling_mask2anomaly
from mask2anomaly_model_cards.card import write_model_card
from mask2anomaly_model_cards.publish import main as publish_main
from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation

PACKAGE_DIR = Path(modeling_mask2anomaly.__file__).parent  # where the installed package keeps handler.py
RESULT = {
    "model": "runs/tiny", "benchmark": "smiyc_ra21", "benchmark_name": "SMIYC RoadAnomaly21 (validation)",
    "mode": "exact", "num_images": 10, "num_items": 10,
    "options": {"flip_tta": True, "refine": True, "scorer": "mask2anomaly"},
    "metrics": {"auprc": 0.887123, "fpr95": 0.14567, "auroc": 0.9712, "siou": 0.4321, "ppv": None, "mean_f1": 0.25},
}
RESULT_OBSTACLE = {**RESULT, "benchmark": "smiyc_ro21", "benchmark_name": "SMIYC RoadObstacle21 (validation)",
                   "metrics": {"auprc": 0.5, "fpr95": 0.002, "auroc": 0.99}}


@pytest.fixture
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


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
    for module in _remote_modules(out):  # the package's files, whatever the model folder holds
        assert (out / f"{module}.py").read_bytes() == (PACKAGE_DIR / f"{module}.py").read_bytes(), module
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


def _widget(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "road.png"
    Image.new("RGB", (96, 64), (90, 90, 90)).save(path)
    return path


def test_publish_ships_only_the_weights_the_model_loads(model_dir, tmp_path):
    from safetensors.torch import save_file

    from mask2anomaly_model_cards.publish import assemble_hub_folder

    single = tmp_path / "single"
    shutil.copytree(model_dir, single)
    save_file({"exp_avg": torch.zeros(4)}, single / "optimizer.safetensors")
    out = tmp_path / "hub-single"
    out.mkdir()
    files = assemble_hub_folder(single, out, "org/tiny", widget_images=[_widget(tmp_path)])
    assert [f for f in files if f.endswith(".safetensors")] == ["model.safetensors"]

    sharded = tmp_path / "sharded"
    torch.manual_seed(0)
    Mask2AnomalyForUniversalSegmentation(Mask2AnomalyConfig.tiny()).save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    save_file({"exp_avg": torch.zeros(4)}, sharded / "optimizer.safetensors")
    save_file({"w": torch.zeros(4)}, sharded / "model-00009-of-00009.safetensors")  # a leftover, not in the index
    out = tmp_path / "hub-sharded"
    out.mkdir()
    files = assemble_hub_folder(sharded, out, "org/tiny", widget_images=[_widget(tmp_path)])
    assert {f for f in files if "safetensors" in f} == shards | {"model.safetensors.index.json"}
    for shard in shards:
        assert (out / shard).read_bytes() == (sharded / shard).read_bytes()


def test_publish_refuses_links_out_of_the_model_folder(model_dir, tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "secret.safetensors"
    shutil.copyfile(model_dir / "model.safetensors", secret)
    for name, target in [("model.safetensors", secret), ("preprocessor_config.json", outside / "p.json")]:
        folder = tmp_path / f"linked-{name}"
        shutil.copytree(model_dir, folder)
        if target.suffix == ".json":
            shutil.copyfile(model_dir / name, target)
        (folder / name).unlink()
        (folder / name).symlink_to(target)
        out = tmp_path / f"hub-{name}"
        assert publish_main([str(folder), "--repo-id", "org/tiny", "--dry-run", "--output-dir", str(out),
                             "--widget-image", str(_widget(tmp_path))]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{folder / name} is a link to {target}" in err and "outside" in err
        assert not out.exists()
    # a link that stays inside the folder is its own file
    inside = tmp_path / "linked-inside"
    shutil.copytree(model_dir, inside)
    (inside / "weights").mkdir()
    (inside / "model.safetensors").rename(inside / "weights" / "model.safetensors")
    (inside / "model.safetensors").symlink_to(inside / "weights" / "model.safetensors")
    from mask2anomaly_model_cards.publish import check_model_dir

    assert [p.name for p in check_model_dir(inside)] == ["model.safetensors"]


def test_publish_names_a_bad_config_or_foreign_remote_code_in_one_line(model_dir, tmp_path, capsys):
    cases = {
        "not-json": "{model_type: mask2anomaly",
        "a-list": "[1, 2]",
        "absolute-auto-map": None,
    }
    for name, text in cases.items():
        folder = tmp_path / name
        shutil.copytree(model_dir, folder)
        if text is None:
            config = json.loads((folder / "config.json").read_text())
            config["auto_map"]["AutoModel"] = "/etc/evil.Model"
            text = json.dumps(config)
        (folder / "config.json").write_text(text)
        out = tmp_path / f"hub-{name}"
        assert publish_main([str(folder), "--repo-id", "org/tiny", "--dry-run", "--output-dir", str(out),
                             "--widget-image", str(_widget(tmp_path))]) == 1, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "config.json" in err and "Traceback" not in err, (name, err)
        assert not out.exists()


DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo_model"


def _demo_copy(folder: Path, **record_changes) -> Path:
    """The demo model's config, processor, weights and training record (as mask2anomaly-train wrote it), with
    `record_changes` applied to the record (e.g. what `--max-steps 4` records)."""
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        shutil.copy(DEMO_MODEL / name, folder / name)
    record = yaml.safe_load((DEMO_MODEL / "training_config.yaml").read_text())
    record.update(record_changes)
    (folder / "training_config.yaml").write_text(yaml.safe_dump(record))
    return folder


def test_card_of_a_synthroad_run_tells_its_own_recipe(tmp_path):
    """A SynthRoad run stopped by --max-steps 4: the card gives the steps it made (4), once, and its own data and
    learning rate, not the config's 200 steps nor the official Cityscapes recipe."""
    command = ("mask2anomaly-train --config synthroad --stage 2 --init-from outputs/m2a-stage1 "
               "--output-dir outputs/m2a-final --max-steps 4")
    record = yaml.safe_load((DEMO_MODEL / "training_config.yaml").read_text())
    record["config"]["data"]["train"]["num"] = 2000
    folder = _demo_copy(tmp_path / "run", max_steps=4, command=command, init_from="outputs/m2a-stage1",
                        config=record["config"])
    text = ModelCard.load(write_model_card(folder)).text
    training = text[text.index("## Training"):text.index("## Limitations")]
    assert "| max_steps | `4` |" in training and "`200`" not in training and training.count("max_steps") == 1
    assert ("Stage 2 (outlier exposure): 4 optimizer steps of 8 images on 2000 SynthRoad scenes (split train, "
            "seed 0), AdamW lr 0.0002, backbone frozen, outliers pasted from 500 SynthRoad scenes (seed 0) with "
            "probability 0.5, initialised from `outputs/m2a-stage1`.") in training
    assert "official recipe" not in training and "90k" not in training and "Cityscapes" not in training
    assert "--output-dir outputs/m2a-final" in training  # the command as it was run
    assert "--output-dir outputs/predict images/" in text  # the predict CLI's own default folder


def test_card_without_a_record_gives_the_official_recipe_and_the_processors_threshold(tmp_path):
    folder = _demo_copy(tmp_path / "converted")
    (folder / "training_config.yaml").unlink()
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    processor.update(anomaly_scorer="rba", anomaly_threshold=-0.5)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    text = ModelCard.load(write_model_card(folder)).text
    training = text[text.index("## Training"):text.index("## Limitations")]
    assert "does not record how it was trained" in training and "90k iterations" in training
    assert "pixels above\nthe threshold -0.5" in text and "`rba`" in text
