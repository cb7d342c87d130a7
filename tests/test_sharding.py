"""Many processes for `mask2anomaly-predict` (`sharding.py`): the shards partition the inputs, and two CPU processes
started by `--num-processes 2` or by `accelerate launch` predict each image exactly once and write byte for
byte the files one process writes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shared_paths import LAUNCHES_ACCELERATE
from tiny_models import random_image, save_tiny_model

from modeling_mask2anomaly.predict import main
from modeling_mask2anomaly.sharding import ProcessInfo, current_process, shard, shard_bounds, worker_environment

SUMMARY = re.compile(r"^(?P<path>\S+): \d+x\d+, max score")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [0, 1, 2, 5, 7, 10])
def test_shards_partition_the_inputs(length, count):
    items = [f"image{i}" for i in range(length)]
    shards = [shard(items, index, count) for index in range(count)]
    # numpy's array_split: contiguous blocks, the first `length % count` one longer
    expected = [list(block) for block in np.array_split(np.array(items, dtype=object), count)]
    assert shards == expected
    assert sum(shards, []) == items


def test_shard_bounds_refuse_a_shard_that_does_not_exist():
    with pytest.raises(ValueError, match="shard 2 of 2 does not exist"):
        shard_bounds(5, 2, 2)


def test_worker_environment_is_what_a_launcher_sets():
    env = worker_environment(1, 2, base={"PATH": "/bin"})
    assert {k: env[k] for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PATH")} == {
        "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "PATH": "/bin"}
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert worker_environment(0, 2, base={"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"


def test_current_process_reads_what_the_launchers_set(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"):
        monkeypatch.delenv(name, raising=False)
    assert current_process() == ProcessInfo(0, 1, 0)
    monkeypatch.setenv("PMI_SIZE", "4")  # mpirun (accelerate's multi-CPU route)
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("MPI_LOCALRANKID", "1")
    assert current_process() == ProcessInfo(3, 4, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun / accelerate launch: these come first
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="started 2 processes but this one's RANK is 2; expected 0 to 1"):
        current_process()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sharding")
    model = save_tiny_model(root / "model", "refining")
    images = root / "images"
    images.mkdir()
    # five images of three sizes, two sharing a stem in different folders (names decided on the whole list)
    for name, (height, width), seed in [("a.png", (40, 56), 1), ("b.png", (40, 56), 2), ("c.png", (30, 44), 3),
                                        ("d.png", (36, 36), 4)]:
        Image.fromarray(random_image(height, width, seed=seed)).save(images / name)
    (images / "sub").mkdir()
    Image.fromarray(random_image(40, 56, seed=5)).save(images / "sub" / "a.png")
    (images / "broken.png").write_bytes(b"not an image")
    single = root / "single"
    assert main([str(images), "--model", str(model), "--output-dir", str(single), "--batch-size", "2"]) == 1
    return {"root": root, "model": model, "images": images, "single": single}


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _check_like_one_process(ws: dict, out: Path, stdout: str) -> None:
    single = _files(ws["single"])
    assert len(single) == 15  # five good images, three outputs each; the broken file has none
    assert _files(out) == single, "the processes write what one process writes"
    predicted = [SUMMARY.match(line)["path"] for line in stdout.splitlines() if SUMMARY.match(line)]
    assert sorted(predicted) == sorted(str(p) for p in ws["images"].rglob("*.png") if p.name != "broken.png"), \
        "each image predicted exactly once"


def test_num_processes_shards_like_one_process(workspace, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "two"
    code = main([str(workspace["images"]), "--model", str(workspace["model"]), "--output-dir", str(out),
                 "--batch-size", "2", "--num-processes", "2"])
    captured = capfd.readouterr()
    assert code == 1, captured.err  # the broken file fails, in the process that got it
    assert captured.err.count("broken.png") == 1
    assert "input(s) failed (process " in captured.err
    _check_like_one_process(workspace, out, captured.out)


@LAUNCHES_ACCELERATE
def test_accelerate_launch_shards_like_one_process(workspace, tmp_path):
    out = tmp_path / "accelerate"
    accelerate = Path(sys.executable).with_name("accelerate")
    # --multi_gpu is accelerate's torchrun launcher; without GPUs each process runs on the CPU (gloo)
    result = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "modeling_mask2anomaly.predict",
         str(workspace["images"]), "--model", str(workspace["model"]), "--output-dir", str(out), "--batch-size", "2"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert "broken.png" in result.stderr and "(process " in result.stderr, result.stderr[-3000:]
    _check_like_one_process(workspace, out, result.stdout)


def test_num_processes_must_match_the_launcher(workspace, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([str(workspace["images"]), "--model", str(workspace["model"]), "--num-processes", "3"]) == 2
    assert "under a launcher, its number of processes (2); got 3" in capsys.readouterr().err
