"""The one evaluation loop (`mask2anomaly_eval.loop.evaluate`) and its users: the HF Trainer route's metrics are the
loop's, at the ORIGINAL image size (checked against a naive re-implementation of the post-processing and
scikit-learn), a registry benchmark goes straight into the loop, the component threshold can be given, and the one
label-PNG reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torch.nn import functional as F

from mask2anomaly_eval.datasets import get_benchmark
from mask2anomaly_eval.io import read_label_png
from mask2anomaly_eval.loop import evaluate, evaluate_splits
from mask2anomaly_eval.metrics import ComponentMetricAccumulator
from mask2anomaly_eval.run import build_parser
from mask2anomaly_training.config import load_config
from mask2anomaly_training.sources import load_source
from mask2anomaly_training.synthroad import main as synthroad_main
from modeling_mask2anomaly import (
    Mask2AnomalyConfig,
    Mask2AnomalyForUniversalSegmentation,
    Mask2AnomalyImageProcessor,
    predict_anomaly,
)

# 64x128 scenes: the processor (shortest edge 80) resizes them to 80x160 and pads that to 96x160, so the original,
# the processed and the padded size all differ and a metric at the processed size would differ.
HEIGHT, WIDTH = 64, 128
SHORTEST_EDGE = 80
VALIDATION = (f"data.validation.anomaly={{source: synthroad, split: anomaly, num: 2, seed: 1, height: {HEIGHT}, "
              f"width: {WIDTH}}}")
TINY = [
    "model.preset=tiny",
    "model.config={}",
    f"processor.size={{shortest_edge: {SHORTEST_EDGE}, longest_edge: {2 * SHORTEST_EDGE}}}",
    "data.train={source: synthroad, split: train, num: 2, seed: 0, height: 64, width: 128}",
    "data.outliers={source: synthroad, num: 2, seed: 0, height: 64, width: 128}",
    "data.validation={}",
    "data.crop_size=[64, 128]",
    "data.num_workers=0",
    "stage1.batch_size=2",
    "training.logging_steps=1",
    "training.checkpoint_steps=0",
    "training.eval_steps=0",
    "training.eval_refine=false",
    # one image per forward pass, like the references below: batch composition changes float rounding, and the
    # near-tied scores of a random tiny model turn 1e-7 differences into 1e-5 ones in AuPRC
    "training.eval_batch_size=1",
    VALIDATION,
]


def naive_anomaly_map(model, processor, image: np.ndarray) -> np.ndarray:
    """Unrefined ``1 - max_c sum_q p_qc sigmoid(m_q)`` at the original size, written out: mask logits x4 to the
    padded size, cropped to the resized image, bilinearly resized to the original size, then sigmoid (the order of
    Mask2Former's ``sem_seg_postprocess`` + ``semantic_inference``)."""
    inputs = processor(images=[image], return_tensors="pt")
    device = next(model.parameters()).device  # the Trainer puts the model on its accelerator, if any
    with torch.no_grad():
        outputs = model(pixel_values=inputs["pixel_values"].to(device))
    h, w = image.shape[:2]
    scale = SHORTEST_EDGE / min(h, w)
    resized = (round(h * scale), round(w * scale))
    masks = F.interpolate(outputs.masks_queries_logits.cpu(), scale_factor=4, mode="bilinear", align_corners=False)
    masks = masks[..., : resized[0], : resized[1]]
    masks = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)
    probs = outputs.class_queries_logits.cpu().softmax(-1)[..., :-1]
    return (1 - torch.einsum("bqc,bqhw->bchw", probs, masks.sigmoid()).max(1).values[0]).numpy()


def sklearn_metrics(maps, labels) -> dict[str, float]:
    valid = [label != 255 for label in labels]
    y = np.concatenate([label[v] == 1 for label, v in zip(labels, valid)])
    s = np.concatenate([m[v] for m, v in zip(maps, valid)])
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {"auprc": average_precision_score(y, s), "auroc": roc_auc_score(y, s), "fpr95": fpr[np.argmax(tpr >= 0.95)]}


def test_trainer_metrics_are_the_loops_at_the_original_size(tmp_path):
    from mask2anomaly_training.trainer import build_trainer

    config = load_config("synthroad", TINY)
    trainer = build_trainer(config, tmp_path / "trainer", stage=1, max_steps=1, save_strategy="no", disable_tqdm=True)
    metrics = trainer.evaluate()
    assert {"eval_anomaly_auprc", "eval_anomaly_fpr95", "eval_anomaly_auroc"} <= set(metrics)
    logged = [entry for entry in trainer.state.log_history if "eval_anomaly_auprc" in entry]
    assert logged and logged[-1]["eval_anomaly_auprc"] == metrics["eval_anomaly_auprc"]

    model, processor = trainer.model.eval(), trainer.processing_class
    assert processor.processed_size((HEIGHT, WIDTH)) != (HEIGHT, WIDTH)  # the test needs a resize
    split = load_source(config.data.validation["anomaly"])
    images = [np.asarray(item["image"].convert("RGB")) for item in split]
    labels = [np.asarray(item["label"]) for item in split]
    assert all(label.shape == (HEIGHT, WIDTH) for label in labels)
    # the maps at the original size, written out here, are the ones predict_anomaly gives ...
    maps = [prediction.anomaly_map for prediction in predict_anomaly(model, processor, images, flip_tta=False,
                                                                      refine=False)]
    for anomaly_map, image in zip(maps, images):
        assert anomaly_map.shape == (HEIGHT, WIDTH)
        np.testing.assert_allclose(anomaly_map, naive_anomaly_map(model, processor, image), atol=1e-5)
    # ... and the Trainer's metrics are scikit-learn's on them
    expected = sklearn_metrics(maps, labels)
    for key in ("auprc", "auroc", "fpr95"):
        assert metrics[f"eval_anomaly_{key}"] == pytest.approx(expected[key], abs=1e-9), key
    # and the loop itself, called as the runner calls it, gives the same numbers
    result = evaluate(model, processor, split, refine=False, flip_tta=False, progress=False)
    for key in ("auprc", "auroc", "fpr95"):
        assert result["metrics"][key] == pytest.approx(metrics[f"eval_anomaly_{key}"], abs=1e-9), key


@pytest.fixture(scope="module")
def benchmark_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    data = root / "synthroad"
    assert synthroad_main(["--split", "anomaly", "--num", "2", "--height", str(HEIGHT), "--width", str(WIDTH),
                           "--seed", "5", "--output-dir", str(data)]) == 0
    torch.manual_seed(0)
    model = Mask2AnomalyForUniversalSegmentation(Mask2AnomalyConfig.tiny()).eval()
    processor = Mask2AnomalyImageProcessor(size={"shortest_edge": SHORTEST_EDGE, "longest_edge": 2 * SHORTEST_EDGE})
    return data, model, processor


def test_registry_benchmark_goes_into_the_loop_and_a_given_component_threshold(benchmark_setup):
    data, model, processor = benchmark_setup
    benchmark = get_benchmark("synthroad", data)
    images = [np.array(Image.open(path).convert("RGB")) for path in benchmark.image_paths]
    labels = [frame.labels for frame in benchmark]
    predictions = predict_anomaly(model, processor, images, flip_tta=False, refine=False)
    result = evaluate(model, processor, benchmark, refine=False, flip_tta=False, components=True,
                      anomaly_threshold=0.5, progress=False)
    assert result["num_images"] == 2 and result["failures"] == []
    expected = sklearn_metrics([prediction.anomaly_map for prediction in predictions], labels)
    for key in ("auprc", "auroc", "fpr95"):
        assert result["metrics"][key] == pytest.approx(expected[key], abs=1e-9), key
    # the components are scored at the given threshold, not at the pixel curve's best-F1 one
    assert result["component"]["component_threshold"] == 0.5 and result["options"]["anomaly_threshold"] == 0.5
    reference = ComponentMetricAccumulator("anomaly", 0.5)
    for prediction, label in zip(predictions, labels):
        reference.add(prediction.anomaly_map, label)
    want = reference.compute()
    for key in ("siou", "ppv", "mean_f1"):
        assert (result["metrics"][key] is None) if np.isnan(want[key]) else result["metrics"][key] == pytest.approx(
            want[key]), key


def test_cli_flags_share_the_config_field_names():
    parser = build_parser()
    base = ["--model", "m", "--benchmark", "synthroad", "--data-dir", "d"]
    assert parser.parse_args([*base, "--anomaly-scorer", "msp"]).anomaly_scorer == "msp"
    assert parser.parse_args([*base, "--scorer", "msp"]).anomaly_scorer == "msp"  # the old name still works
    assert parser.parse_args([*base, "--anomaly-threshold", "0.3"]).anomaly_threshold == 0.3


def test_anomaly_threshold_needs_components(capsys):
    from mask2anomaly_eval.run import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "m", "--benchmark", "synthroad", "--data-dir", "d", "--anomaly-threshold", "0.3"])
    assert exit_info.value.code == 2 and "needs --components" in capsys.readouterr().err


def test_read_label_png(tmp_path):
    values = np.array([[0, 1, 2], [255, 7, 0]], np.uint8)
    Image.fromarray(values).save(tmp_path / "l.png")
    assert read_label_png(tmp_path / "l.png").tolist() == values.tolist()
    palette = Image.fromarray(values, mode="P")
    palette.putpalette([200, 10, 10] * 256)  # colours that a luminance conversion would turn into other values
    palette.save(tmp_path / "p.png")
    assert read_label_png(tmp_path / "p.png").tolist() == values.tolist()  # indices, not colours
    assert read_label_png(Image.open(tmp_path / "p.png")).tolist() == values.tolist()
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png has mode 'RGB'; expected a single-channel"):
        read_label_png(tmp_path / "rgb.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read label image .*broken\.png"):
        read_label_png(tmp_path / "broken.png")
    with pytest.raises(ValueError, match=r"cannot read label image .*missing\.png"):
        read_label_png(tmp_path / "missing.png")


def test_evaluate_splits_keys_and_a_bad_validation_image(benchmark_setup):
    data, model, processor = benchmark_setup
    benchmark = get_benchmark("synthroad", data)
    values = evaluate_splits(model, processor, {"road": benchmark}, refine=False, flip_tta=False, progress=False)
    single = evaluate(model, processor, benchmark, refine=False, flip_tta=False, progress=False)["metrics"]
    assert values == {f"road_{key}": single[key] for key in ("auprc", "fpr95", "auroc")}
    rows = [benchmark[0],
            {"name": "bad.png", "image": np.zeros((64, 128, 3), np.uint8), "label": np.zeros((32, 128), np.uint8)}]
    with pytest.raises(ValueError, match=r"validation split 'road'.*bad\.png: label is 32x128 but the image is 64x128"):
        evaluate_splits(model, processor, {"road": rows}, progress=False)
