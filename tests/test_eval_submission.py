"""Submission writers: the SegmentMeIfYouCan kit's file layout (path template, persisted dataset folder, frame ids,
dataset key, float16, gzip 9 — as read from the kit's `Evaluation.save_output` / `ChannelLoaderHDF5` and
`datasets/tracks*.py`), read back by our reader and by h5py itself; the Fishyscapes per-frame files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mask2anomaly_eval.submission import (
    check_smiyc_frame_count,
    fishyscapes_frame_id,
    fishyscapes_inputs,
    read_smiyc_frame,
    smiyc_frame_id,
    write_fishyscapes_frame,
    write_smiyc_frame,
)


def test_smiyc_file_matches_the_kit_and_reads_back_within_float16(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.random((37, 53)).astype(np.float32)
    path = write_smiyc_frame(tmp_path, "Mask2Anomaly", "AnomalyTrack-test", "zebra0000", scores)
    # the kit: DIR_OUTPUTS / "anomaly_p/{method_name}/{dset_name}/{fid}.hdf5", dset_name = the parent dataset's
    assert path == tmp_path / "anomaly_p" / "Mask2Anomaly" / "AnomalyTrack-all" / "zebra0000.hdf5"
    assert sorted(p.name for p in path.parent.iterdir()) == ["zebra0000.hdf5"]  # no temporary file left
    with h5py.File(path, "r") as handle:
        assert list(handle.keys()) == ["value"]
        dataset = handle["value"]
        assert dataset.dtype == np.float16
        assert dataset.compression == "gzip" and dataset.compression_opts == 9
        assert dataset.shape == scores.shape
        raw = dataset[()]
    ours = read_smiyc_frame(path)
    assert ours.dtype == np.float16
    np.testing.assert_array_equal(ours, raw)
    np.testing.assert_array_equal(raw, scores.astype(np.float16))
    # float16 rounding: half an ulp of [0.5, 1) is 2**-12
    assert np.abs(raw.astype(np.float32) - scores).max() <= 2.0 ** -12


@pytest.mark.parametrize("dataset, image, folder, frame_id", [
    ("AnomalyTrack-test", "images/airplane0000.jpg", "AnomalyTrack-all", "airplane0000"),
    ("AnomalyTrack-validation", "images/validation0003.jpg", "AnomalyTrack-all", "validation0003"),
    ("ObstacleTrack-test", "images/curvy-street_000123.webp", "ObstacleTrack-all", "curvy-street_000123"),
    ("LostAndFound-testNoKnown", "leftImg8bit/test/02_Hanns_Klemm_Str_44/02_Hanns_Klemm_Str_44_000000_000080"
     "_leftImg8bit.png", "LostAndFound-test", "02_Hanns_Klemm_Str_44_000000_000080"),
])
def test_smiyc_frame_ids_and_folders_as_the_kit_names_them(tmp_path, dataset, image, folder, frame_id):
    assert smiyc_frame_id(image, dataset) == frame_id
    path = write_smiyc_frame(tmp_path, "m", dataset, frame_id, np.zeros((4, 5), np.float32))
    assert path.relative_to(tmp_path).as_posix() == f"anomaly_p/m/{folder}/{frame_id}.hdf5"


def test_smiyc_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="AnomalyTrack-test"):
        write_smiyc_frame(tmp_path, "m", "RoadAnomaly21", "x", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="_leftImg8bit"):
        smiyc_frame_id("frame.png", "LostAndFound-test")
    with pytest.raises(ValueError, match="float16"):
        write_smiyc_frame(tmp_path, "m", "AnomalyTrack-test", "x", np.full((2, 2), 1e6, np.float32))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        write_smiyc_frame(tmp_path, "m", "AnomalyTrack-test", "x", np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="method"):
        write_smiyc_frame(tmp_path, "a/b", "AnomalyTrack-test", "x", np.zeros((2, 2)))
    bad = tmp_path / "bad.hdf5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="bad.hdf5"):
        read_smiyc_frame(bad)
    assert "expects 100" in check_smiyc_frame_count("AnomalyTrack-test", 3)
    assert check_smiyc_frame_count("AnomalyTrack-test", 100) is None


def test_fishyscapes_frame_files(tmp_path):
    assert fishyscapes_frame_id("/input/0042_lost_and_found.png") == "0042"
    kept, problems = fishyscapes_inputs(["/input/0001_a.png", "/input/x.png", "/input/0001_b.png"])
    assert [p.name for p in kept] == ["0001_a.png"]
    assert len(problems) == 2 and "DDDD_*.png" in problems[0] and "0001" in problems[1]
    anomaly = np.random.default_rng(1).random((6, 9)).astype(np.float64)
    semantic = np.arange(54, dtype=np.uint8).reshape(6, 9) % 19
    paths = write_fishyscapes_frame(tmp_path, "0042", anomaly, semantic)
    assert [p.name for p in paths] == ["0042_anomaly.npy", "0042_segmentation.npy"]
    read_anomaly = np.load(paths[0], allow_pickle=False)
    assert read_anomaly.dtype == np.float32 and read_anomaly.shape == (6, 9)
    np.testing.assert_array_equal(read_anomaly, anomaly.astype(np.float32))
    read_semantic = np.load(paths[1], allow_pickle=False)
    assert read_semantic.dtype.kind in "iu"
    np.testing.assert_array_equal(read_semantic, semantic)
    with pytest.raises(ValueError, match="integer class ids"):
        write_fishyscapes_frame(tmp_path, "0043", anomaly, semantic[:3])
