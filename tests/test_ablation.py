"""The ablation driver: which runs it trains, which flags each row gets, and the table it prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from mask2anomaly_eval import ablation


def test_train_missing_trains_only_absent_runs_and_stage2_from_the_gma_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ablation, "_run", lambda command: calls.append(command))
    runs = {name: tmp_path / name for name in ("gma_stage1", "nogma_stage1", "gma_stage2")}
    runs["gma_stage1"].mkdir()
    (runs["gma_stage1"] / "config.json").write_text("{}")
    ablation.train_missing("synthroad", runs)
    assert len(calls) == 2
    nogma, stage2 = calls
    assert nogma[nogma.index("--output-dir") + 1] == str(runs["nogma_stage1"])
    assert "model.config.global_masked_attention=false" in nogma and nogma[nogma.index("--stage") + 1] == "1"
    assert stage2[stage2.index("--stage") + 1] == "2"
    assert stage2[stage2.index("--init-from") + 1] == str(runs["gma_stage1"])
    assert all(call[call.index("--config") + 1] == "synthroad" for call in calls)


def test_rows_add_one_component_at_a_time():
    flags = [set(row[2]) for row in ablation.ROWS]
    models = [row[1] for row in ablation.ROWS]
    assert models == ["nogma_stage1", "gma_stage1", "gma_stage2", "gma_stage2", "gma_stage2"]
    assert flags[:3] == [{"--no-refine", "--no-flip"}] * 3
    assert flags[3] == {"--no-flip"} and flags[4] == set()


def test_markdown_table_in_percent():
    rows = [{"row": "X", "anomaly": {"auprc": 0.1234, "fpr95": 0.5, "auroc": 0.9},
             "obstacle": {"auprc": 0.05, "fpr95": 0.987, "auroc": 0.7}}]
    table = ablation.markdown_table(rows).splitlines()
    assert table[2] == "| X | 12.3 | 50.0 | 5.0 | 98.7 |"


DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo_model"  # a real stage-2 run with GMA on


def _run_folder(folder: Path, gma: bool, stage: int) -> Path:
    """A run folder as mask2anomaly-train writes it: the demo model's config.json and training_config.yaml
    with the GMA setting and the stage replaced."""
    import json

    import yaml

    folder.mkdir(parents=True)
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    config["global_masked_attention"] = gma
    (folder / "config.json").write_text(json.dumps(config))
    record = yaml.safe_load((DEMO_MODEL / "training_config.yaml").read_text())
    record["stage"] = stage
    (folder / "training_config.yaml").write_text(yaml.safe_dump(record))
    return folder


def test_the_demo_model_passes_as_the_stage2_run_and_matching_runs_pass(tmp_path):
    ablation.check_run("gma_stage2", DEMO_MODEL)
    ablation.check_runs({"gma_stage2": DEMO_MODEL, "gma_stage1": _run_folder(tmp_path / "b", True, 1),
                         "nogma_stage1": _run_folder(tmp_path / "a", False, 1)})


@pytest.mark.parametrize("key, gma, stage, message", [
    ("nogma_stage1", True, 1, r"global_masked_attention=true, but row\(s\) A need .*global_masked_attention=false"),
    ("gma_stage1", False, 1, r"global_masked_attention=false, but row\(s\) B need"),
    ("gma_stage1", True, 2, r"stage 2, but row\(s\) B need a stage-1 run"),
    ("gma_stage2", True, 1, r"stage 1, but row\(s\) C, D, E need a stage-2 run"),
])
def test_a_run_that_does_not_match_its_rows_is_refused(tmp_path, key, gma, stage, message):
    folder = _run_folder(tmp_path / key, gma, stage)
    with pytest.raises(ValueError, match=message):
        ablation.check_run(key, folder)


def test_a_run_without_its_record_is_refused(tmp_path):
    folder = _run_folder(tmp_path / "run", False, 1)
    (folder / "training_config.yaml").unlink()
    with pytest.raises(ValueError, match=r"training_config.yaml not found: cannot check .* row\(s\) A"):
        ablation.check_run("nogma_stage1", folder)


def test_main_refuses_a_gma_run_as_row_a_before_training_or_evaluating(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(ablation, "_run", lambda command: calls.append(command))
    status = ablation.main(["--output-dir", str(tmp_path / "out"), "--nogma-stage1", str(DEMO_MODEL)])
    assert status == 2 and calls == []  # nothing trained, generated or evaluated
    error = capsys.readouterr().err.strip()
    assert error.startswith("ablation: ") and "config.json" in error and len(error.splitlines()) == 1
    assert "global_masked_attention=true, but row(s) A need" in error
