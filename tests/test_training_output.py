"""What a person sees of a training run (issue 16 items 4, 11): a start-up summary, log lines above the progress bar
(never glued onto it), no accelerate chatter per checkpoint, a readable final summary, grouped TensorBoard tags
without a `step` scalar or hparams runs, a one-line refusal of ``--resume`` with another ``--max-steps``, and a
Trainer-route folder that `mask2anomaly-publish` accepts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.preset=tiny", "model.config={}", "processor.size={shortest_edge: 64, longest_edge: 128}",
    "data.train={source: synthroad, split: train, num: 4, seed: 0, height: 64, width: 128}",
    "data.validation={anomaly: {source: synthroad, split: anomaly, num: 2, seed: 1, height: 64, width: 128}}",
    "data.crop_size=[64, 128]", "data.num_workers=0", "stage1.batch_size=2", "training.logging_steps=1",
    "training.checkpoint_steps=1", "training.eval_steps=1", "training.report_to=tensorboard",
]
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ")


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output = tmp_path_factory.mktemp("train") / "run"
    result = run_module("mask2anomaly_training.cli", "--output-dir", str(output), "--max-steps", "2", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stderr


def test_startup_summary_and_final_summary(run):
    output, stderr = run
    text = " ".join(stderr.split())
    assert "stage 1: building the model" in text and "preparing the data" in text
    assert ("stage 1: 4 training images, steps 1..2 of 2, 2 images per step (1 process(es) x 2 per process x 1 "
            "accumulation), learning rate 0.002") in text
    assert f"model -> {output}; checkpoints -> {output / 'checkpoints'}" in text
    assert f"TensorBoard -> {output / 'mask2anomaly-stage1'}" in text and "validation splits: anomaly" in text
    final = [line for line in stderr.splitlines() if "stage 1 done after 2 steps" in line]
    assert len(final) == 1
    assert re.search(r"model in \S+; anomaly: AuPRC \d+\.\d\d, FPR95 \d+\.\d\d, AUROC \d+\.\d\d \(%\)$", final[0])
    assert not re.search(r"\d\.\d{8,}", stderr), "raw floats in the output"


def test_log_lines_are_never_glued_onto_the_progress_bar(run):
    _, stderr = run
    # the bar redraws itself after "\r"; a log line written without clearing it would share a segment with it
    segments = [segment for segment in re.split(r"[\r\n]", stderr) if " INFO " in segment]
    assert segments and all(TIMESTAMP.match(segment) for segment in segments), [
        s for s in segments if not TIMESTAMP.match(s)]
    assert sum("step 1/2: loss " in segment for segment in segments) == 1
    # accelerate's per-checkpoint INFO lines ("Saving current state to ...", "Model weights saved in ...") are quiet
    assert "accelerate" not in stderr and "Saving current state" not in stderr


def test_tensorboard_tags_are_grouped(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _ = run
    event_dirs = sorted({path.parent for path in output.rglob("events.out.tfevents.*")})
    assert event_dirs == [output / "mask2anomaly-stage1"]  # no hparams run beside it
    events = EventAccumulator(str(event_dirs[0]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "loss/cross_entropy", "loss/dice", "loss/mask", "lr/head", "time/seconds_per_step",
            "eval/anomaly_auprc", "eval/anomaly_fpr95", "eval/anomaly_auroc"} == tags
    assert [event.step for event in events.Scalars("loss/total")] == [1, 2]


def test_resume_with_other_max_steps_is_one_line(run):
    output, _ = run
    result = run_module("mask2anomaly_training.cli", "--output-dir", str(output), "--max-steps", "3", "--resume", *TINY)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mask2anomaly-train:")]
    assert errors == [f"mask2anomaly-train: --resume: checkpoint {output / 'checkpoints' / 'checkpoint-00000002'} "
                      "belongs to stage 1 with max_steps 2; this run is stage 1 with max_steps 3 (the schedule's "
                      "length cannot change mid-run: resume with --max-steps 2, or train into a new --output-dir)"]


def test_reporting_helpers():
    from mask2anomaly_training.reporting import log_line, metrics_summary, tracker_values

    log = {"loss": 12.5, "loss_dice": 3.0, "loss_contrastive": 0.25, "lr": 1e-3, "seconds_per_step": 1.234,
           "anomaly_auprc": 0.399, "anomaly_fpr95": 1.0, "step": 7}
    evals = {"anomaly_auprc", "anomaly_fpr95"}
    assert tracker_values(log, evals) == {"loss/total": 12.5, "loss/dice": 3.0, "loss/contrastive": 0.25,
                                          "lr/head": 1e-3, "time/seconds_per_step": 1.234,
                                          "eval/anomaly_auprc": 0.399, "eval/anomaly_fpr95": 1.0}
    assert log_line(7, 10, log, evals) == ("step 7/10: loss 12.5, loss_dice 3, loss_contrastive 0.25, lr 0.001, "
                                           "1.23 s/step; anomaly: AuPRC 39.90, FPR95 100.00 (%)")
    assert metrics_summary({"obstacle_auroc": 0.5, "anomaly_fpr95": float("nan"), "obstacle_auprc": 0.25}) == (
        "anomaly: FPR95 – (%); obstacle: AuPRC 25.00, AUROC 50.00 (%)")


def test_trainer_route_folder_is_publishable(tmp_path, monkeypatch):
    output = tmp_path / "trainer"
    overrides = [o for o in TINY if not o.startswith(("data.validation", "training.eval_steps"))]
    result = run_module("mask2anomaly_training.trainer", "--output-dir", str(output), "--max-steps", "1",
                        "data.validation={}", "training.eval_steps=0", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(output.rglob("training_args.bin"))  # a pickle: publish refuses it, and loading it unpickles
    assert (output / "training_args.json").is_file() and (output / "checkpoint-1" / "training_args.json").is_file()

    from mask2anomaly_model_cards import publish as publishing
    from mask2anomaly_model_cards.cli import main as publish

    hub = tmp_path / "hub"
    command = [str(output), "--repo-id", "org/trainer-tiny", "--dry-run", "--output-dir", str(hub)]
    assert publish(command) == 0  # with the smoke test: the folder loads without this package
    first = (hub / "README.md").read_bytes()
    # what follows is about the output folder only: the same folder's smoke test would take a subprocess each
    monkeypatch.setattr(publishing, "smoke_test", lambda folder: {"model": "not checked again", "anomaly_map": []})
    assert publish(command) == 1  # a second dry run into a used folder needs --overwrite
    (hub / "marker").write_text("from the first run")
    assert publish([*command, "--overwrite"]) == 0
    assert not (hub / "marker").exists() and (hub / "README.md").read_bytes() == first
    stranger = tmp_path / "not-a-hub-folder"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    assert publish([str(output), "--repo-id", "org/x", "--dry-run", "--output-dir", str(stranger), "--overwrite"]) == 1
    assert (stranger / "notes.txt").read_text() == "keep me"
