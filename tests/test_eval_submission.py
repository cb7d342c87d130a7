"""Submission writers: the SegmentMeIfYouCan kit's file layout (path template, persisted dataset folder, frame ids,
dataset key, float16, gzip 9 — as read from the kit's `Evaluation.save_output` / `ChannelLoaderHDF5` and
`datasets/tracks*.py`), read back by our reader and by h5py itself; the Fishyscapes per-frame files; and the trees
`mask2anomaly-predict --format smiyc|fishyscapes` writes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image
from tiny_models import random_image, save_tiny_model

from mask2anomaly_eval.submission import (
    SubmissionWriter,
    check_smiyc_frame_count,
    fishyscapes_frame_id,
    read_smiyc_frame,
    smiyc_frame_id,
    write_fishyscapes_frame,
    write_smiyc_frame,
)
from modeling_mask2anomaly import predict_anomaly
from modeling_mask2anomaly.inference import load_model_and_processor
from modeling_mask2anomaly.predict import main as predict_main


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
    kept, problems = SubmissionWriter("fishyscapes", tmp_path).select(["/input/0001_a.png", "/input/x.png",
                                                                       "/input/0001_b.png"])
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


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("submission_model")
    save_tiny_model(root / "model")
    return root / "model"


def _image(path, height, width, seed):
    Image.fromarray(random_image(height, width, seed)).save(path)


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_predict_fishyscapes_layout(tiny_folder, tmp_path):
    inputs = tmp_path / "input"
    inputs.mkdir()
    _image(inputs / "0000_frame.png", 48, 80, 0)
    _image(inputs / "0017_other.png", 40, 72, 1)
    code = predict_main([str(inputs), "--model", str(tiny_folder), "--output-dir", str(tmp_path / "output"),
                         "--format", "fishyscapes", "--device", "cpu", "--no-flip"])
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "output").iterdir())
    assert names == ["0000_anomaly.npy", "0000_segmentation.npy", "0017_anomaly.npy", "0017_segmentation.npy"]
    for frame_id, shape in (("0000", (48, 80)), ("0017", (40, 72))):
        anomaly = np.load(tmp_path / "output" / f"{frame_id}_anomaly.npy", allow_pickle=False)
        segmentation = np.load(tmp_path / "output" / f"{frame_id}_segmentation.npy", allow_pickle=False)
        assert anomaly.dtype == np.float32 and anomaly.shape == shape  # the input's resolution
        assert segmentation.dtype.kind in "iu" and segmentation.shape == shape
        assert np.isfinite(anomaly).all() and segmentation.max() < 19
    # a file that does not follow DDDD_*.png is named and the run fails, the others are still written
    _image(inputs / "stray.png", 40, 72, 2)
    code = predict_main([str(inputs), "--model", str(tiny_folder), "--output-dir", str(tmp_path / "output2"),
                         "--format", "fishyscapes", "--device", "cpu", "--no-flip"])
    assert code == 1 and len(list((tmp_path / "output2").iterdir())) == 4


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_predict_smiyc_tree_reads_back_as_the_maps(tiny_folder, tmp_path, capsys):
    images = tmp_path / "dataset_AnomalyTrack" / "images"
    images.mkdir(parents=True)
    _image(images / "airplane0000.jpg", 48, 80, 3)
    _image(images / "zebra0001.jpg", 48, 80, 4)
    out = tmp_path / "outputs"
    code = predict_main([str(images), "--model", str(tiny_folder), "--output-dir", str(out), "--format", "smiyc",
                         "--method", "Mask2Anomaly", "--dataset", "AnomalyTrack-test", "--device", "cpu"])
    assert code == 0
    assert "expects 100" in capsys.readouterr().err  # two frames of the 100 the kit reads
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["anomaly_p/Mask2Anomaly/AnomalyTrack-all/airplane0000.hdf5",
                     "anomaly_p/Mask2Anomaly/AnomalyTrack-all/zebra0001.hdf5"]
    model, processor = load_model_and_processor(tiny_folder)
    for name in ("airplane0000", "zebra0001"):
        expected = predict_anomaly(model, processor, np.array(Image.open(images / f"{name}.jpg")))[0].anomaly_map
        with h5py.File(out / "anomaly_p/Mask2Anomaly/AnomalyTrack-all" / f"{name}.hdf5", "r") as handle:
            stored = handle["value"][()]
        assert stored.dtype == np.float16 and stored.shape == expected.shape
        np.testing.assert_allclose(stored.astype(np.float32), expected, atol=2.0 ** -11)
    assert predict_main([str(images), "--model", str(tiny_folder), "--output-dir", str(out), "--format", "smiyc",
                         "--device", "cpu"]) == 2
    assert "--method" in capsys.readouterr().err
