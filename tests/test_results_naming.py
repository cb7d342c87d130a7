"""Results that stay apart (issue 16 item 2): `mask2anomaly-eval` names its files by benchmark and split, records
the split, the track, the number of images and whether `--limit` cut them; a SynthRoad split implies its track;
the model card shows the split and the limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mask2anomaly_eval.cli import main as eval_main
from mask2anomaly_eval.datasets import get_benchmark
from mask2anomaly_model_cards.card import render_model_card
from mask2anomaly_training.synthroad import main as synthroad_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("splits")
    for split in ("anomaly", "obstacle"):
        assert synthroad_main(["--split", split, "--num", "3", "--seed", "1", "--height", "64", "--width", "128",
                               "--output-dir", str(root / f"{split}-test")]) == 0
    return root


def test_synthroad_folder_says_its_split(splits, tmp_path):
    metadata = json.loads((splits / "obstacle-test" / "synthroad.json").read_text())
    assert (metadata["split"], metadata["num"], metadata["height"], metadata["width"]) == ("obstacle", 3, 64, 128)
    assert get_benchmark("synthroad", splits / "obstacle-test").track == "obstacle"
    assert get_benchmark("synthroad", splits / "anomaly-test").track == "anomaly"
    assert get_benchmark("synthroad", splits / "obstacle-test", track="anomaly").track == "anomaly"  # --track wins
    # a folder without the metadata (generated before it existed): its name, when it is a test split's
    bare = tmp_path / "obstacle"
    for sub in ("images", "labels"):
        (bare / sub).mkdir(parents=True)
        for path in (splits / "obstacle-test" / sub).glob("*.png"):
            (bare / sub / path.name).write_bytes(path.read_bytes())
    assert get_benchmark("synthroad", bare).split == "obstacle"
    assert get_benchmark("synthroad", bare).track == "obstacle"
    renamed = bare.rename(tmp_path / "somewhere")
    assert get_benchmark("synthroad", renamed).split is None


def test_two_splits_two_files_and_the_card_shows_them(splits, tmp_path):
    out = tmp_path / "results"
    common = ["--model", str(REPO / "demo_model"), "--benchmark", "synthroad", "--output-dir", str(out), "--no-flip"]
    assert eval_main([*common, "--data-dir", str(splits / "anomaly-test")]) == 0
    assert eval_main([*common, "--data-dir", str(splits / "obstacle-test"), "--limit", "2", "--components"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".md")) == ["synthroad-anomaly.json", "synthroad-anomaly.md",
                                                     "synthroad-obstacle.json", "synthroad-obstacle.md"]
    anomaly = json.loads((out / "synthroad-anomaly.json").read_text())
    obstacle = json.loads((out / "synthroad-obstacle.json").read_text())
    assert (anomaly["split"], anomaly["track"], anomaly["num_images"]) == ("anomaly", "anomaly", 3)
    assert anomaly["limited"] is False
    assert (obstacle["split"], obstacle["track"], obstacle["num_images"]) == ("obstacle", "obstacle", 2)
    assert (obstacle["limit"], obstacle["num_available"], obstacle["limited"]) == (2, 3, True)
    assert obstacle["component"]["track"] == "obstacle"  # the components were scored on the implied track
    assert "Limited by --limit 2 to the first 2 of 3 images" in (out / "synthroad-obstacle.md").read_text()

    card = str(render_model_card(REPO / "demo_model", sorted(out.glob("*.json")), repo_id="org/demo"))
    rows = [line for line in card.splitlines() if line.startswith("| SynthRoad")]
    assert len(rows) == 2
    assert rows[0].startswith("| SynthRoad (anomaly) | 3 |")
    assert rows[1].startswith("| SynthRoad (obstacle) | 2 of 3 (--limit) |")
    assert "split: obstacle" in card and "split: anomaly" in card  # the model-index entries
