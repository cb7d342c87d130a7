"""The ablation driver: which runs it trains, which flags each row gets, and the table it prints."""

from __future__ import annotations

from pathlib import Path

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
