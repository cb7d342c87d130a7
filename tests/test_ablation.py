"""The ablation driver: which runs it trains, which flags each row gets, and the table it prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from mask2anomaly_eval import ablation


def _record_calls(monkeypatch, tmp_path, existing=("gma_stage1",)):
    calls = []
    monkeypatch.setattr(ablation, "_run", lambda command: calls.append(command))
    runs = {name: tmp_path / name for name in ("gma_stage1", "nogma_stage1", "gma_stage2")}
    for name in existing:
        runs[name].mkdir()
        (runs[name] / "config.json").write_text("{}")
    return calls, runs


def _value(call, flag):
    return call[call.index(flag) + 1]


def test_train_missing_trains_only_absent_runs_and_stage2_from_the_gma_run(tmp_path, monkeypatch):
    """cityscapes.yaml has no stage-1 continuation: each stage 1 is one command."""
    calls, runs = _record_calls(monkeypatch, tmp_path)
    ablation.train_missing("cityscapes", runs)
    assert len(calls) == 2
    nogma, stage2 = calls
    assert _value(nogma, "--output-dir") == str(runs["nogma_stage1"]) and "--init-from" not in nogma
    assert "model.config.global_masked_attention=false" in nogma and _value(nogma, "--stage") == "1"
    assert _value(stage2, "--stage") == "2"
    assert _value(stage2, "--init-from") == str(runs["gma_stage1"])
    assert all(_value(call, "--config") == "cityscapes" for call in calls)


def test_train_missing_runs_the_recipes_stage1_continuation_for_both_stage1_rows(tmp_path, monkeypatch):
    """synthroad.yaml continues stage 1 with a second command; both stage-1 runs (GMA on and off) get it, the
    continuation keeps the no-GMA override, and stage 2 starts from the continued GMA run."""
    import yaml

    recipe = yaml.safe_load((Path(ablation.__file__).parents[1] / "training/configs/synthroad.yaml").read_text())
    continuation = recipe["stage1_continuation"]
    assert continuation == ["stage1.max_steps=900", "stage1.learning_rate=5.0e-4", "training.seed=1"]
    calls, runs = _record_calls(monkeypatch, tmp_path, existing=())
    ablation.train_missing("synthroad", runs)
    assert [(_value(c, "--stage"), Path(_value(c, "--output-dir")).name) for c in calls] == [
        ("1", "nogma_stage1-part1"), ("1", "nogma_stage1"), ("1", "gma_stage1-part1"), ("1", "gma_stage1"),
        ("2", "gma_stage2")]
    first, second = calls[0], calls[1]
    assert "--init-from" not in first and not set(continuation) & set(first)
    assert _value(second, "--init-from") == str(tmp_path / "nogma_stage1-part1")
    assert second[-len(continuation):] == continuation
    assert "model.config.global_masked_attention=false" in first and "model.config.global_masked_attention=false" in second
    assert "model.config.global_masked_attention=false" not in calls[2] + calls[3]
    assert _value(calls[3], "--init-from") == str(tmp_path / "gma_stage1-part1")
    assert _value(calls[4], "--init-from") == str(runs["gma_stage1"])


def test_train_missing_reuses_a_finished_first_part(tmp_path, monkeypatch):
    calls, runs = _record_calls(monkeypatch, tmp_path, existing=("gma_stage1", "gma_stage2"))
    (tmp_path / "nogma_stage1-part1").mkdir()
    (tmp_path / "nogma_stage1-part1" / "config.json").write_text("{}")
    ablation.train_missing("synthroad", runs)
    assert len(calls) == 1 and _value(calls[0], "--init-from") == str(tmp_path / "nogma_stage1-part1")


def test_a_continuation_entry_that_is_not_an_override_is_refused(tmp_path, monkeypatch, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("stage1_continuation: [stage1.max_steps=5, --resume]\n")
    calls, runs = _record_calls(monkeypatch, tmp_path, existing=())
    with pytest.raises(ValueError, match=r"stage1_continuation entry '--resume' is not a key=value override"):
        ablation.train_missing(str(config), runs)
    assert calls == []


def test_a_continuation_with_an_unknown_key_is_refused_before_anything_trains(tmp_path, monkeypatch):
    config = tmp_path / "typo.yaml"
    config.write_text("stage1_continuation: [stage1.max_step=5]\n")
    calls, runs = _record_calls(monkeypatch, tmp_path, existing=())
    with pytest.raises(ValueError, match=r"stage1_continuation: unknown config key 'stage1.max_step'; valid keys of "
                                         r"stage1: .*max_steps"):
        ablation.train_missing(str(config), runs)
    assert calls == []


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
