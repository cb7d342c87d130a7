"""Tests of the training routes: the accelerate script (`mask2anomaly_training.train`) and the HF Trainer route
(`mask2anomaly_training.trainer`), on tiny SynthRoad scenes (64x128) and the tiny model.

Every check compares with something computed independently of the code under test: a loss recomputed with a
fixed point sampling, weights read back from the files of another run, the poly formula, scikit-learn's metrics
on anomaly maps computed directly from the model outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file
from shared_paths import LAUNCHES_ACCELERATE
from sklearn.metrics import average_precision_score, roc_auc_score
from tiny_models import ANOMALY_SPLIT, tiny_config
from tiny_models import TINY_TRAINING as TINY
from torch.nn import functional as F

from mask2anomaly_training.checkpoint import list_checkpoints
from mask2anomaly_training.collate import TrainingCollator
from mask2anomaly_training.config import load_config
from mask2anomaly_training.loop import optimizer_step
from mask2anomaly_training.model import backbone_of, build_model, freeze_backbone, set_train_mode
from mask2anomaly_training.optim import parameter_groups, poly_schedule
from mask2anomaly_training.sampling import ProcessBatchSampler, global_batch_indices
from mask2anomaly_training.sources import load_source, make_augmentation, stage_data, training_dataset
from mask2anomaly_training.train import train

REPO = Path(__file__).resolve().parents[1]
BACKBONE_PREFIX = "model.pixel_level_module.encoder."

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The test machines are small and shared: two OpenMP threads per process fighting for the same cores are
    # many times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# ----------------------------------------------------------------------------------------------------- config
def test_packaged_configs_hold_the_official_hyper_parameters():
    config = load_config("cityscapes")
    s1, s2 = config.stage1, config.stage2
    # docs/method.md: AdamW lr 1e-4, wd 0.05, poly 0.9, backbone x0.1, full-model clip 0.01, crop 380x760,
    # batch 16, 90k iterations; stage 2 lr 1e-5, batch 8, 5000 iterations, backbone frozen; paste p = 0.2.
    assert (s1.learning_rate, s1.weight_decay, s1.poly_power, s1.backbone_lr_multiplier) == (1e-4, 0.05, 0.9, 0.1)
    assert (s1.max_grad_norm, s1.batch_size, s1.max_steps, s1.outlier_exposure) == (0.01, 16, 90000, False)
    assert (s2.learning_rate, s2.batch_size, s2.max_steps, s2.freeze_backbone, s2.outlier_exposure) == (
        1e-5, 8, 5000, True, True)
    assert config.data.crop_size == [380, 760] and config.data.outlier_probability == 0.2
    assert config.model.preset == "paper"
    synth = load_config("synthroad")
    assert synth.stage2.freeze_backbone and synth.stage2.outlier_exposure and not synth.stage1.outlier_exposure


def test_overrides_and_bad_keys_name_the_valid_ones(tmp_path):
    config = tiny_config("stage1.learning_rate=2e-4", "data.train.num=5")
    assert config.stage1.learning_rate == 2e-4 and config.data.train["num"] == 5
    with pytest.raises(ValueError, match=r"'stage1.learning_rat'.*valid keys of stage1: learning_rate"):
        tiny_config("stage1.learning_rat=1")
    with pytest.raises(ValueError, match="not of the form"):
        tiny_config("stage1.max_steps")
    with pytest.raises(FileNotFoundError, match="packaged configs: cityscapes, synthroad"):
        load_config("no-such-config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {seed: 0}\nstage3: {}\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*'stage3'.*model, processor, data, training, stage1, stage2"):
        load_config(bad)


def test_pasted_outliers_carry_the_processors_outlier_label():
    # issue 11: with processor.outlier_label=200 the pasted pixels used to stay 254, so the image got a class
    # label 254 and no outlier pixels. Every image gets an outlier here (p = 1); the expected outlier pixels
    # are counted directly on the augmented label maps, before the processor.
    config = tiny_config("processor.outlier_label=200", "data.outlier_probability=1.0")
    _, processor = build_model(config)
    assert processor.outlier_label == 200
    dataset, _, _ = stage_data(config, 2)
    rows = [dataset[0], dataset[1]]
    pasted = [int((np.asarray(row["label"]) == 200).sum()) for row in rows]
    assert all(count > 0 for count in pasted), pasted
    assert not any((np.asarray(row["label"]) == 254).any() for row in rows)
    batch = TrainingCollator(processor, outlier_labels=True)(rows)
    assert [int(t.sum()) for t in batch["outlier_labels"]] == pasted
    classes = torch.cat(batch["class_labels"]).tolist()
    assert classes and max(classes) < 19, classes


@pytest.mark.parametrize("name", ["cityscapes", "synthroad"])
def test_packaged_configs_load_every_value_of_their_file(name):
    # Every leaf of the YAML file, read with plain PyYAML, is the config's value (YAML 1.1 reads 1.0e-4 as a
    # float but 1e-4 as a string: numeric strings of float fields are floats), mappings included as a whole.
    raw = yaml.safe_load((REPO / "training" / "configs" / f"{name}.yaml").read_text())
    config = load_config(name)

    def check(values, node, where):
        for key, value in values.items():
            actual = node[key] if isinstance(node, dict) else getattr(node, key)
            if isinstance(value, dict) and not isinstance(actual, dict):
                check(value, actual, f"{where}{key}.")
            else:
                expected = float(value) if isinstance(value, str) and isinstance(actual, float) else value
                assert actual == expected and type(actual) is type(expected), (f"{where}{key}", actual, value)

    check(raw, config, "")


def test_wrong_keys_and_values_are_one_line_errors():
    with pytest.raises(ValueError, match=r"unknown config key 'data.trian'; valid keys of data: train, outliers, "
                                         r"validation, crop_size") as caught:
        tiny_config("data.trian.num=1")
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=r"stage1.max_steps='abc'") as caught:
        tiny_config("stage1.max_steps=abc")
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=r"stage2.batch_size=None") as caught:
        tiny_config("stage2.batch_size=")
    assert "\n" not in str(caught.value)


def test_override_merges_into_mappings_and_replaces_whole_ones():
    base = load_config("synthroad")
    config = load_config("synthroad", ["data.train.num=5", "model.config.num_queries=7", "processor.size={shortest_edge: 64}"])
    assert config.data.train == {**base.data.train, "num": 5}
    assert config.model.config == {**base.model.config, "num_queries": 7}
    assert config.processor == {"size": {"shortest_edge": 64}}
    # a whole mapping given replaces the file's one; a null validation split is dropped by validation_splits
    replaced = load_config("synthroad", ["model.config={}", "data.validation.obstacle=null"])
    assert replaced.model.config == {} and replaced.data.validation["obstacle"] is None
    assert replaced.data.validation["anomaly"] == base.data.validation["anomaly"]
    # the same source keeps the file's arguments
    assert load_config("synthroad", ["data.train.source=synthroad"]).data.train == base.data.train


def test_generated_synthroad_folder_is_what_training_reads(tmp_path, monkeypatch):
    # issue 16 item 3: `mask2anomaly-synthroad --split train ... --output-dir D` then
    # `mask2anomaly-train --config synthroad data.train.source=folder data.train.root=D` must train on D.
    from mask2anomaly_training import synthroad
    from mask2anomaly_training import train as train_module

    folder = tmp_path / "synthroad" / "train"
    assert synthroad.main(["--split", "train", "--num", "3", "--seed", "5", "--height", "64", "--width", "128",
                           "--output-dir", str(folder)]) == 0
    calls = []
    monkeypatch.setattr(train_module, "train", lambda config, output_dir, **kwargs: calls.append((config, kwargs)))
    # `--resume` directly before an override continues the newest checkpoint and keeps the override
    argv = ["--config", "synthroad", "--output-dir", str(tmp_path / "run"), "--resume",
            f"data.train.root={folder}", "data.train.source=folder", "--max-steps", "1", "stage1.batch_size=2"]
    assert train_module.main(argv) == 0
    (config, kwargs), = calls
    assert kwargs["resume"] == "latest" and kwargs["max_steps"] == 1 and config.stage1.batch_size == 2
    assert config.data.train == {"source": "folder", "root": str(folder)}
    road = load_source(config.data.train)
    assert len(road) == 3
    for index, row in enumerate(road):
        stem = synthroad.item_stem("train", index)
        image, label = synthroad.generate_item("train", index, seed=5, height=64, width=128)
        np.testing.assert_array_equal(np.asarray(row["image"].convert("RGB")), image)
        np.testing.assert_array_equal(np.asarray(row["label"]), label)
        np.testing.assert_array_equal(np.asarray(row["label"]),
                                      np.asarray(Image.open(folder / "labels" / f"{stem}.png")))
    # a checkpoint folder after --resume is still taken as one
    calls.clear()
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-00000001"
    assert train_module.main(["--output-dir", str(tmp_path / "run"), "--resume", str(checkpoint),
                              "stage1.batch_size=2"]) == 0
    assert calls[0][1]["resume"] == str(checkpoint) and calls[0][0].stage1.batch_size == 2


# ------------------------------------------------------------------------------------- optimiser and schedule
def test_parameter_groups_and_poly_schedule_follow_detectron2():
    # the official lr and backbone multiplier (synthroad.yaml departs from them for its from-scratch backbone)
    config = tiny_config("stage1.learning_rate=1e-4", "stage1.backbone_lr_multiplier=0.1")
    model, _ = build_model(config)
    groups = parameter_groups(model, config.stage1)
    backbone = {id(p) for p in backbone_of(model).parameters()}
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)
    for name, parameter in model.named_parameters():
        expected_lr = 1e-5 if id(parameter) in backbone else 1e-4
        assert lr_of[id(parameter)] == pytest.approx(expected_lr), name
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert norms and all(decay_of[id(m.weight)] == 0.0 for m in norms)
    assert decay_of[id(model.model.transformer_module.queries_features.weight)] == 0.0  # an nn.Embedding
    assert decay_of[id(model.class_predictor.weight)] == 0.05

    optimizer = torch.optim.AdamW(groups)
    scheduler = poly_schedule(optimizer, max_steps=10, power=0.9)
    for step in range(10):
        head = max(g["lr"] for g in optimizer.param_groups)
        assert head == pytest.approx(1e-4 * (1 - step / 10) ** 0.9)
        optimizer.step()
        scheduler.step()
    assert max(g["lr"] for g in optimizer.param_groups) == 0.0


def test_global_batches_do_not_depend_on_processes_or_accumulation():
    n, batch = 13, 4  # 3 full batches per epoch, the 13th image dropped
    for epoch in (0, 1):
        single = [i for b in ProcessBatchSampler(n, batch, 1, 0, 1, 5, epoch, 0) for i in b]
        split = [ProcessBatchSampler(n, batch, 2, rank, 2, 5, epoch, 0) for rank in (0, 1)]
        micro = [list(s) for s in split]
        assert all(len(m) == 1 for s in micro for m in s)
        # global batch b is rank 0's two micro-batches then rank 1's
        rebuilt = [i for b in range(3) for rank in (0, 1) for m in micro[rank][2 * b: 2 * b + 2] for i in m]
        assert rebuilt == single and len(set(single)) == 12
        assert single[:4] == global_batch_indices(n, batch, 5, epoch, 0)
    # resuming at global batch 2 yields exactly the tail
    tail = [i for b in ProcessBatchSampler(n, batch, 1, 0, 1, 5, 0, 2) for i in b]
    assert tail == [i for b in ProcessBatchSampler(n, batch, 1, 0, 1, 5, 0, 0) for i in b][8:]


# ---------------------------------------------------------------------------------------- steps on one batch
def _fixed_batch(config, stage: int):
    torch.manual_seed(0)
    model, processor = build_model(config)
    outliers = load_source(config.data.outliers, outliers=True) if stage == 2 else None
    dataset, _ = training_dataset(load_source(config.data.train), make_augmentation(config.data, outliers), seed=0)
    batch = TrainingCollator(processor, outlier_labels=stage == 2)([dataset[0], dataset[1]])
    return model, batch


def _loss(model, batch) -> float:
    # The Mask2Former loss samples points at random: the same seed gives the same points before and after.
    torch.manual_seed(1234)
    with torch.no_grad():
        return float(model(**batch).loss)


def _steps(model, batch, settings, steps: int) -> None:
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(parameter_groups(model, settings))
    scheduler = poly_schedule(optimizer, 100, settings.poly_power)
    for _ in range(steps):
        optimizer_step(model, [batch], optimizer, scheduler, accelerator, settings.max_grad_norm)


def test_stage1_steps_lower_the_loss_of_a_fixed_batch():
    config = tiny_config("stage1.learning_rate=1e-3")
    model, batch = _fixed_batch(config, stage=1)
    assert "outlier_labels" not in batch  # closed set: no contrastive loss
    set_train_mode(model, frozen_backbone=False)
    before = _loss(model, batch)
    _steps(model, batch, config.stage1, steps=8)
    after = _loss(model, batch)
    assert after < 0.97 * before, (before, after)


def test_stage2_lowers_the_loss_and_leaves_the_frozen_backbone_untouched():
    config = tiny_config("stage2.learning_rate=1e-3", "data.outlier_probability=1.0")
    model, batch = _fixed_batch(config, stage=2)
    assert (batch["outlier_labels"] == 1).any(), "every image should have a pasted outlier"
    freeze_backbone(model)
    set_train_mode(model, frozen_backbone=True)
    backbone_before = {k: v.clone() for k, v in backbone_of(model).state_dict().items()}
    rest_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(BACKBONE_PREFIX)}
    torch.manual_seed(0)
    assert "loss_contrastive" in model(**batch).loss_dict
    before = _loss(model, batch)
    _steps(model, batch, config.stage2, steps=8)
    after = _loss(model, batch)
    assert after < 0.97 * before, (before, after)
    # weights and BatchNorm statistics of the backbone are bit-identical; the rest has moved
    for key, value in backbone_of(model).state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    changed = [k for k, v in model.state_dict().items() if k in rest_before and not torch.equal(v, rest_before[k])]
    assert any(k.startswith("class_predictor.") for k in changed)
    assert any(".transformer_module.decoder.layers." in k for k in changed)


# ------------------------------------------------------------------------------- full runs, resume, stage 2
@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """An uninterrupted stage-1 run of 6 steps (an epoch has 4), with checkpoints at steps 3 and 6."""
    output = tmp_path_factory.mktemp("stage1")
    config = tiny_config("training.checkpoint_steps=3", "training.eval_refine=false", ANOMALY_SPLIT)
    train(config, output, stage=1, max_steps=6)
    return config, output


def test_resume_after_a_kill_gives_the_uninterrupted_weights(stage1_run, tmp_path):
    config, uninterrupted = stage1_run
    checkpoints = list_checkpoints(uninterrupted / "checkpoints")
    assert [p.name for p in checkpoints] == ["checkpoint-00000003", "checkpoint-00000006"]
    # The killed run: its step-3 checkpoint, plus the half-written folder of a save interrupted at step 5.
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoints[0], resumed / "checkpoints" / checkpoints[0].name)
    (resumed / "checkpoints" / ".tmp-checkpoint-00000005").mkdir()
    (resumed / "checkpoints" / ".tmp-checkpoint-00000005" / "model.safetensors").write_bytes(b"truncated")
    train(config, resumed, stage=1, max_steps=6, resume="latest")

    expected = load_file(uninterrupted / "model.safetensors")
    actual = load_file(resumed / "model.safetensors")
    at_kill = load_file(checkpoints[0] / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert any(not torch.equal(expected[k], at_kill[k]) for k in expected), "steps 4-6 must change the weights"
    # The logged losses of every step agree too (steps 1-3 come back with the checkpoint).
    def logged(folder):
        history = json.loads((folder / "eval_results.json").read_text())["history"]
        return [{k: v for k, v in entry.items() if k != "seconds_per_step"} for entry in history]

    assert [entry["step"] for entry in logged(resumed)] == [1, 2, 3, 4, 5, 6]
    assert logged(resumed) == logged(uninterrupted)


def test_output_folder_loads_and_its_metrics_match_sklearn(stage1_run):
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    config, output = stage1_run
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "modeling_mask2anomaly.py",
                 "training_config.yaml", "eval_results.json"):
        assert (output / name).is_file(), name
    record = yaml.safe_load((output / "training_config.yaml").read_text())
    assert record["stage"] == 1 and record["max_steps"] == 6 and record["config"]["data"]["crop_size"] == [64, 128]

    model = AutoModelForUniversalSegmentation.from_pretrained(output).eval()
    processor = AutoImageProcessor.from_pretrained(output)
    assert type(model).__name__ == "Mask2AnomalyForUniversalSegmentation"
    assert torch.equal(model.class_predictor.weight, load_file(output / "model.safetensors")["class_predictor.weight"])
    # Independent scoring (method.md): a = 1 - max_c sum_q softmax(class_q)[c] sigmoid(upsampled mask_q),
    # refinement off, scored with scikit-learn on the non-void pixels.
    final = json.loads((output / "eval_results.json").read_text())["final"]
    split = load_source(config.data.validation["anomaly"])
    scores, labels = [], []
    for item in split:
        image = np.asarray(item["image"].convert("RGB"))
        with torch.no_grad():
            outputs = model(pixel_values=processor(images=[image], return_tensors="pt")["pixel_values"])
        masks = F.interpolate(outputs.masks_queries_logits, size=image.shape[:2], mode="bilinear", align_corners=False)
        probs = outputs.class_queries_logits.softmax(-1)[..., :-1]
        anomaly = 1 - torch.einsum("bqc,bqhw->bchw", probs, masks.sigmoid()).max(1).values[0]
        label = np.asarray(item["label"])
        scores.append(anomaly.numpy()[label != 255])
        labels.append(label[label != 255])
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    assert final["anomaly_auprc"] == pytest.approx(average_precision_score(labels, scores), abs=1e-5)
    assert final["anomaly_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-5)


def test_stage2_from_a_stage1_folder_freezes_the_backbone(stage1_run, tmp_path):
    config, stage1 = stage1_run
    output = tmp_path / "stage2"
    config2 = tiny_config("data.outlier_probability=1.0", ANOMALY_SPLIT)
    final = train(config2, output, stage=2, max_steps=2, init_from=str(stage1))
    before, after = load_file(stage1 / "model.safetensors"), load_file(output / "model.safetensors")
    backbone = [k for k in before if k.startswith(BACKBONE_PREFIX)]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)  # running stats included
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in backbone)
    history = json.loads((output / "eval_results.json").read_text())["history"]
    assert all(entry["loss_contrastive"] > 0 for entry in history)
    assert set(final) == {"anomaly_auprc", "anomaly_fpr95", "anomaly_auroc"}


@LAUNCHES_ACCELERATE
def test_two_process_accelerate_launch(tmp_path):
    output = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "mask2anomaly_training.train", "--config", "synthroad", "--output-dir", str(output),
        "--max-steps", "2", *TINY, "stage1.batch_size=4", "training.checkpoint_steps=1", ANOMALY_SPLIT,
        "data.validation.anomaly.num=3", "training.eval_batch_size=1",
    ]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert yaml.safe_load((output / "training_config.yaml").read_text())["num_processes"] == 2
    checkpoint = output / "checkpoints" / "checkpoint-00000002"
    assert sorted(p.name for p in checkpoint.glob("random_states_*.json")) == ["random_states_0.json",
                                                                              "random_states_1.json"]
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (output / name).is_file()
    # The 3 validation images were split 2 + 1 over the processes: the merged metrics equal one process's
    # (one image per forward pass on both sides, since batch composition changes float rounding).
    from mask2anomaly_training.train import evaluate_anomaly
    from modeling_mask2anomaly import Mask2AnomalyForUniversalSegmentation
    from modeling_mask2anomaly.image_processing_mask2anomaly import Mask2AnomalyImageProcessor

    config = tiny_config(ANOMALY_SPLIT, "data.validation.anomaly.num=3")
    model = Mask2AnomalyForUniversalSegmentation.from_pretrained(output)
    processor = Mask2AnomalyImageProcessor.from_pretrained(output)
    single = evaluate_anomaly(model, processor, {"anomaly": load_source(config.data.validation["anomaly"])},
                              batch_size=1)
    merged = json.loads((output / "eval_results.json").read_text())["final"]
    assert merged == pytest.approx(single, abs=1e-6)


# --------------------------------------------------------------------------------------------- Trainer route
def test_trainer_route_trains_and_reports_anomaly_metrics(tmp_path):
    from mask2anomaly_training.trainer import build_trainer

    config = tiny_config(ANOMALY_SPLIT, "training.eval_steps=2", "training.eval_refine=false",
                         "stage1.learning_rate=1e-3")
    trainer = build_trainer(config, tmp_path / "trainer", stage=1, max_steps=3, save_strategy="no",
                            disable_tqdm=True)
    assert trainer.args.remove_unused_columns is False and trainer.args.eval_do_concat_batches is False
    assert trainer.args.label_names == ["mask_labels", "class_labels", "outlier_labels"]
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval_anomaly_auprc" in entry]
    assert [entry["step"] for entry in logged] == [2, 3]  # every eval_steps, and at the end
    metrics = trainer.evaluate()
    assert any(not torch.equal(v, start[k]) for k, v in trainer.model.state_dict().items())

    # Independent: unrefined 1 - max_c S_c at the processed size, scored with scikit-learn.
    model, processor = trainer.model.eval(), trainer.processing_class
    scores, labels = [], []
    for item in load_source(config.data.validation["anomaly"]):
        image = np.asarray(item["image"].convert("RGB"))
        with torch.no_grad():
            outputs = model(pixel_values=processor(images=[image], return_tensors="pt")["pixel_values"])
        masks = F.interpolate(outputs.masks_queries_logits, scale_factor=4, mode="bilinear", align_corners=False)
        probs = outputs.class_queries_logits.softmax(-1)[..., :-1]
        anomaly = 1 - torch.einsum("bqc,bqhw->bchw", probs, masks.sigmoid()).max(1).values[0]
        label = np.asarray(item["label"])
        anomaly = anomaly[: label.shape[0], : label.shape[1]].numpy()
        scores.append(anomaly[label != 255])
        labels.append(label[label != 255])
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    assert metrics["eval_anomaly_auprc"] == pytest.approx(average_precision_score(labels, scores), abs=1e-5)
    assert metrics["eval_anomaly_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-5)
    assert 0.0 <= metrics["eval_anomaly_fpr95"] <= 1.0
