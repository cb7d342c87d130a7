"""Conversion of official detectron2 checkpoints, and parity of the converted models with the official code.

The parity tests convert every checkpoint of every fixture folder in `PARITY_FIXTURES` (official model outputs
recorded with the authors' code, see each folder's README), load the result with `from_pretrained`, run the
images at their native size and compare with the official arrays. Another folder of the same format only needs
adding to `PARITY_FIXTURES` (or to the `MASK2ANOMALY_PARITY_FIXTURES` environment variable, `os.pathsep`
separated): everything about the architecture comes from its `config.yaml`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from shared_paths import SHARED_FIXTURES
from torch.nn import functional as F
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from modeling_mask2anomaly import Mask2AnomalyForUniversalSegmentation
from modeling_mask2anomaly.conversion import (
    ConversionError,
    Detectron2Config,
    Detectron2ConfigError,
    UnevaluatedTag,
    config_from_detectron2_yaml,
    convert_checkpoint,
    convert_state_dict,
    load_detectron2_yaml,
    load_official_state_dict,
    main,
    preprocessing_from_detectron2,
    target_specs,
)
from modeling_mask2anomaly.image_processing_mask2anomaly import Mask2AnomalyImageProcessor
from modeling_mask2anomaly.inference import predict_anomaly
from modeling_mask2anomaly.modeling_mask2anomaly import logger as modeling_logger

PARITY_FIXTURES = [SHARED_FIXTURES / "official_r50_small", SHARED_FIXTURES / "official_swin_small"]
PARITY_FIXTURES += [Path(p) for p in os.environ.get("MASK2ANOMALY_PARITY_FIXTURES", "").split(os.pathsep) if p]
R50 = SHARED_FIXTURES / "official_r50_small"

LOGIT_ATOL = 1e-4  # max abs difference allowed on class and mask logits of every layer
MAP_ATOL = 1e-4  # ... and on anomaly maps
THRESHOLD_BAND = 1e-4  # refinement-mask pixels this close to 0.5 may legitimately flip


def _cases() -> list[tuple[Path, str, str]]:
    cases = []
    for folder in PARITY_FIXTURES:
        assert (folder / "config.yaml").is_file(), f"parity fixture folder {folder} has no config.yaml"
        checkpoints = sorted(p.name for p in folder.glob("checkpoint*.pth"))
        images = sorted(p.stem for p in folder.glob("img*.npz"))
        assert checkpoints and images, f"parity fixture folder {folder} has no checkpoint*.pth or img*.npz"
        cases += [(folder, ckpt, image) for ckpt in checkpoints for image in images]
    return cases


CASES = _cases()


def _case_id(case: tuple[Path, str, str]) -> str:
    return f"{case[0].name}-{Path(case[1]).stem}-{case[2]}"


_converted: dict[tuple[Path, str], tuple[Mask2AnomalyForUniversalSegmentation, Mask2AnomalyImageProcessor]] = {}
_runs: dict[tuple[Path, str, str], dict] = {}


@pytest.fixture(scope="module")
def run_case(tmp_path_factory):
    """Convert each (fixture folder, checkpoint) once, load it back with from_pretrained, and run each image
    (and its mirror image) once; both parity tests read the same run."""

    def converted(folder: Path, checkpoint: str):
        key = (folder, checkpoint)
        if key not in _converted:
            out = tmp_path_factory.mktemp("converted") / f"{folder.name}-{Path(checkpoint).stem}"
            convert_checkpoint(folder / checkpoint, folder / "config.yaml", out)
            model = Mask2AnomalyForUniversalSegmentation.from_pretrained(out).eval()
            # the fixtures were recorded at the images' native size: no resize, still padded to 32
            processor = Mask2AnomalyImageProcessor.from_pretrained(out, do_resize=False)
            _converted[key] = (model, processor)
        return _converted[key]

    def run(case: tuple[Path, str, str]) -> dict:
        if case not in _runs:
            folder, checkpoint, stem = case
            model, processor = converted(folder, checkpoint)
            image = np.asarray(Image.open(folder / f"{stem}.png").convert("RGB"))
            views = {}
            for view, pixels in (("image", image), ("flipped", np.ascontiguousarray(image[:, ::-1]))):
                inputs = processor(pixels, return_tensors="pt")
                with torch.no_grad():
                    views[view] = model(
                        pixel_values=inputs["pixel_values"], output_auxiliary_logits=True, output_hidden_states=True
                    )
                views[f"{view}_pixel_values"] = inputs["pixel_values"]
            _runs[case] = dict(model=model, processor=processor, rgb=image, **views)
        return _runs[case]

    return run


def _per_layer(out) -> tuple[np.ndarray, np.ndarray]:
    """Class and mask logits of every prediction head, (L + 1, Q, ...): the auxiliary ones, then the final."""
    logits = [aux["class_queries_logits"] for aux in out.auxiliary_logits] + [out.class_queries_logits]
    masks = [aux["masks_queries_logits"] for aux in out.auxiliary_logits] + [out.masks_queries_logits]
    return torch.stack(logits)[:, 0].numpy(), torch.stack(masks)[:, 0].numpy()


def _max_diff(ours: np.ndarray, official: np.ndarray, name: str) -> float:
    assert ours.shape == official.shape, f"{name}: shape {ours.shape} != official {official.shape}"
    return float(np.abs(ours.astype(np.float64) - official.astype(np.float64)).max()) if ours.size else 0.0


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_logits_of_every_layer_match_official(case, run_case):
    folder, _, stem = case
    ref = np.load(folder / f"{stem}.npz")
    run = run_case(case)
    assert _max_diff(run["image_pixel_values"][0].numpy(), ref["input_padded"], "input_padded") < 1e-5

    # intermediate features first, so a failure says which stage diverged
    out = run["image"]
    stages = {f"stats_backbone_res{i + 2}": f for i, f in enumerate(out.encoder_hidden_states)}
    stages.update({f"stats_multi_scale_{i}": f for i, f in enumerate(out.pixel_decoder_hidden_states)})
    stages["stats_mask_features"] = out.pixel_decoder_last_hidden_state
    for name, feature in stages.items():
        if name in ref:
            x = feature.double()
            ours = np.array([x.mean(), x.std(), x.abs().max(), x.abs().mean()])
            np.testing.assert_allclose(ours, ref[name], rtol=1e-5, atol=1e-4, err_msg=f"{name} [mean, std, absmax, absmean]")
    for level in range(4):
        if f"backbone_res{level + 2}" in ref:
            diff = _max_diff(out.encoder_hidden_states[level][0].numpy(), ref[f"backbone_res{level + 2}"], "backbone")
            assert diff <= LOGIT_ATOL, f"backbone_res{level + 2}: max abs diff {diff:.3g}"

    logits, masks = _per_layer(out)
    assert logits.shape[0] == ref["aux_pred_logits"].shape[0], "number of prediction heads differs"
    for layer in range(logits.shape[0]):
        diff = _max_diff(logits[layer], ref["aux_pred_logits"][layer], f"class logits of head {layer}")
        assert diff <= LOGIT_ATOL, f"class logits of head {layer}: max abs diff {diff:.3g}"
        diff = _max_diff(masks[layer], ref["aux_pred_masks"][layer], f"mask logits of head {layer}")
        assert diff <= LOGIT_ATOL, f"mask logits of head {layer}: max abs diff {diff:.3g}"

    flip_logits, flip_masks = _per_layer(run["flipped"])
    assert _max_diff(flip_logits[-1], ref["flip_pred_logits"], "flip class logits") <= LOGIT_ATOL
    assert _max_diff(flip_masks[-1], ref["flip_pred_masks"], "flip mask logits") <= LOGIT_ATOL


@pytest.mark.parametrize(
    "folder", [f for f in PARITY_FIXTURES if (f / "swin_backbone_odd.npz").is_file()], ids=lambda f: f.name
)
def test_swin_backbone_on_odd_unpadded_input(folder, run_case):
    """The official D2SwinTransformer called alone on an un-padded odd-sized image: exercises the patch
    embedding's pad-to-4 and every patch merging's odd-size padding, which the 32-padded model never hits."""
    case = next(c for c in CASES if c[0] == folder)
    backbone = run_case(case)["model"].model.pixel_level_module.encoder
    ref = np.load(folder / "swin_backbone_odd.npz")
    with torch.no_grad():
        features = backbone(torch.from_numpy(ref["input"])[None]).feature_maps
    for level, feature in enumerate(features):
        diff = _max_diff(feature[0].numpy(), ref[f"backbone_res{level + 2}"], f"res{level + 2}")
        assert diff <= LOGIT_ATOL, f"backbone_res{level + 2}: max abs diff {diff:.3g}"


def _refinement_mask(logits: np.ndarray, masks: np.ndarray, kept: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Official R(x) = max over kept queries of score_q * sigmoid(mask_q upsampled to the padded size), cropped;
    recomputed here from the official logits so threshold pixels of the flipped view can be found too."""
    if kept.size == 0:
        return np.zeros(size)
    scores = torch.from_numpy(logits).softmax(-1).max(-1).values[kept]
    padded = (masks.shape[-2] * 4, masks.shape[-1] * 4)
    up = F.interpolate(torch.from_numpy(masks[kept])[None], size=padded, mode="bilinear", align_corners=False)[0]
    return (scores[:, None, None] * up.sigmoid()).amax(0)[: size[0], : size[1]].numpy()


def _threshold_pixels(ref, variant: str) -> np.ndarray:
    """Pixels where an official refinement mask that is applied in `variant` lies within THRESHOLD_BAND of 0.5
    (a float32 port may put them on the other side; the README calls this out)."""
    h, w = ref["image_size"]
    band = np.zeros((h, w), dtype=bool)
    min_kept = 1 if variant == "ref_ge1" else 2
    if variant.startswith("noref"):
        return band
    if int(ref["n_refine"]) >= min_kept:
        band |= np.abs(ref["sem_seg_refine"].max(0) - 0.5) < THRESHOLD_BAND
    if variant == "ref_flip" and int(ref["flip_n_refine"]) >= min_kept:
        flip_r = _refinement_mask(ref["flip_pred_logits"], ref["flip_pred_masks"], ref["flip_refine_query_indices"], (h, w))
        band |= np.abs(flip_r[:, ::-1] - 0.5) < THRESHOLD_BAND
    return band


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_anomaly_maps_match_official(case, run_case):
    folder, _, stem = case
    ref = np.load(folder / f"{stem}.npz")
    run = run_case(case)
    processor, outputs, flipped = run["processor"], run["image"], run["flipped"]
    size = [tuple(int(v) for v in ref["image_size"])]
    h, w = size[0]
    post = processor.post_process_anomaly_segmentation
    ours = {
        "noref": post(outputs, size, refine=False)[0],
        "ref": post(outputs, size, refine=True, refine_min_queries=2)[0],
        "ref_ge1": post(outputs, size, refine=True, refine_min_queries=1)[0],
        "noref_flip": post(outputs, size, refine=False, flipped_outputs=flipped)[0],
        # the one-call API, as users run it: pre-processing, both views, refinement, flip TTA
        "ref_flip": predict_anomaly(run["model"], processor, run["rgb"], flip_tta=True, refine=True)[0].anomaly_map,
    }
    checked = 0
    for variant, ours_map in ours.items():
        key = f"anomaly_{variant}"
        if key not in ref:  # e.g. the Swin set drops anomaly_ref_ge1 (see its README)
            continue
        checked += 1
        diff = np.abs(np.asarray(ours_map, dtype=np.float64) - ref[key])
        assert diff.shape == (h, w), f"{key}: shape {diff.shape} != {(h, w)}"
        off = diff > MAP_ATOL
        unexplained = off & ~_threshold_pixels(ref, variant)
        assert not unexplained.any(), (
            f"{key}: {int(unexplained.sum())} pixels differ by more than {MAP_ATOL} away from the refinement "
            f"threshold (max {diff[unexplained].max():.3g})"
        )
        assert off.sum() <= max(3, 1e-3 * h * w), f"{key}: {int(off.sum())} threshold pixels flipped"
    assert checked >= 4, f"{folder.name}/{stem}: only {checked} anomaly variants in the npz"


# ----------------------------------------------------------------------------------------------------------
# Conversion errors
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r50_parts():
    config = config_from_detectron2_yaml(R50 / "config.yaml")
    with torch.device("meta"):
        specs = target_specs(Mask2AnomalyForUniversalSegmentation(config))
    return dict(load_official_state_dict(R50 / "checkpoint.pth")), config, specs


def test_missing_key_is_named(r50_parts):
    source, config, specs = r50_parts
    broken = {k: v for k, v in source.items() if k != "sem_seg_head.predictor.class_embed.bias"}
    with pytest.raises(ConversionError, match=r"missing.*class_predictor\.bias"):
        convert_state_dict(broken, specs, config)


def test_unknown_key_is_named(r50_parts):
    source, config, specs = r50_parts
    extra = {**source, "sem_seg_head.predictor.some_new_head.weight": torch.zeros(3)}
    with pytest.raises(ConversionError, match=r"no place.*sem_seg_head\.predictor\.some_new_head\.weight"):
        convert_state_dict(extra, specs, config)


def test_wrong_shape_names_key_and_both_shapes(r50_parts):
    source, config, specs = r50_parts
    bad = {**source, "sem_seg_head.predictor.class_embed.weight": torch.zeros(21, 64)}
    with pytest.raises(ConversionError) as info:
        convert_state_dict(bad, specs, config)
    message = str(info.value)
    assert "sem_seg_head.predictor.class_embed.weight" in message and "class_predictor.weight" in message
    assert "[21, 64]" in message and "[20, 64]" in message


def test_shortcut_where_the_model_has_none_is_an_error(r50_parts):
    # variant A's res2 block 0 maps 64 -> 64 channels: identity shortcut in both implementations
    source, config, specs = r50_parts
    extra = {**source, "backbone.res2.0.shortcut.weight": torch.zeros(64, 64, 1, 1)}
    with pytest.raises(ConversionError, match=r"backbone\.res2\.0\.shortcut\.weight"):
        convert_state_dict(extra, specs, config)


def test_frozen_bn_layout_fills_num_batches_tracked(r50_parts):
    source, config, specs = r50_parts
    frozen = load_official_state_dict(R50 / "checkpoint_frozenbn.pth")
    assert len(source) - len(frozen) == 52 and not any("num_batches_tracked" in k for k in frozen)
    counters = [k for k in specs if k.endswith("num_batches_tracked")]
    assert len(counters) == 52
    converted = convert_state_dict(frozen, specs, config)
    assert set(converted) == set(specs)
    assert all(int(converted[k]) == 0 for k in counters)


def test_dropped_keys_are_exactly_the_unused_ones(r50_parts, caplog):
    source, config, specs = r50_parts
    converted = convert_state_dict(source, specs, config)
    # fusion_layer (2 per decoder layer) and criterion.empty_weight have no model counterpart; nothing else
    dropped = [k for k in source if "fusion_layer" in k or k == "criterion.empty_weight"]
    assert len(dropped) == 2 * (config.decoder_layers - 1) + 1
    assert set(converted) == set(specs)
    # every other official tensor reappears bit-identical somewhere (q/k/v are row blocks of in_proj)
    pool = {(tuple(v.shape), v.float().sum().item()) for v in converted.values()}
    for key, value in source.items():
        if key in dropped or "in_proj" in key:
            continue
        assert (tuple(value.shape), value.float().sum().item()) in pool, key


def test_cli_error_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    source = load_official_state_dict(R50 / "checkpoint.pth")
    del source["sem_seg_head.pixel_decoder.mask_features.bias"]
    broken = tmp_path / "broken.pth"
    torch.save({"model": source}, broken)
    out = tmp_path / "out"
    code = main(["--checkpoint", str(broken), "--config", str(R50 / "config.yaml"), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("mask2anomaly-convert: error:") and "mask_projection.bias" in err[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pth"]


def test_cli_success_prints_one_summary_line(tmp_path, capsys):
    out = tmp_path / "model"
    code = main(["--checkpoint", str(R50 / "checkpoint.pth"), "--config", str(R50 / "config.yaml"), "--output-dir", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 1 and "19 classes" in lines[0] and "3 decoder layers" in lines[0]
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_mask2anomaly.py"} <= set(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left behind
    # the official refinement rule (train ids 2..10) is in the processor's file, not in the network's config
    processor_file = json.loads((out / "preprocessor_config.json").read_text())
    assert processor_file["refine"] is True and processor_file["refine_class_ids"] == list(range(2, 11))
    assert not {"refine", "refine_class_ids"} & set(json.loads((out / "config.json").read_text()))
    # an existing folder is only replaced on request
    assert main(["--checkpoint", str(R50 / "checkpoint.pth"), "--config", str(R50 / "config.yaml"), "--output-dir", str(out)]) == 1
    assert main(["--checkpoint", str(R50 / "checkpoint.pth"), "--config", str(R50 / "config.yaml"), "--output-dir", str(out), "--overwrite"]) == 0


# ----------------------------------------------------------------------------------------------------------
# Reading checkpoints safely
# ----------------------------------------------------------------------------------------------------------
class _Payload:
    """Pickles into a call of `marker.touch()` when unpickled: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_training_checkpoint_entries_are_ignored(tmp_path):
    source = load_official_state_dict(R50 / "checkpoint.pth")
    path = tmp_path / "model_0004999.pth"
    torch.save({"model": source, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]},
                "scheduler": {"last_epoch": 4999}, "iteration": 4999}, path)
    loaded = load_official_state_dict(path)
    assert list(loaded) == list(source) and all(torch.equal(loaded[k], source[k]) for k in source)


def test_pth_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    with pytest.raises(ConversionError, match="weights_only"):
        load_official_state_dict(path)
    assert not marker.exists()


def test_pkl_of_numpy_arrays_converts_like_the_pth(tmp_path, r50_parts):
    source, config, specs = r50_parts
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"model": {k: v.numpy() for k, v in source.items()}, "__author__": "test"}, handle, protocol=2)
    from_pkl = convert_state_dict(load_official_state_dict(path), specs, config)
    from_pth = convert_state_dict(source, specs, config)
    assert all(torch.equal(from_pkl[k], from_pth[k]) for k in specs)


def test_pkl_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"model": {"x": np.zeros(1)}, "extra": _Payload(marker)}, handle)
    with pytest.raises(ConversionError, match="refused"):
        load_official_state_dict(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# detectron2 configs
# ----------------------------------------------------------------------------------------------------------
def _load_benchmark():
    # the benchmark owns the paper-size checkpoint layout and the official-style config; reuse, don't copy
    spec = importlib.util.spec_from_file_location("bench_convert", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


def _write_paper_yaml(folder: Path, marker: Path, changes: dict[str, object] | None = None) -> Path:
    """The released Cityscapes inference config as the authors ship it (partial file, `_BASE_` with an eval
    tag, here one that would touch `marker` if evaluated), with `changes` ({"MODEL.RESNETS.DEPTH": 34}) applied."""
    path = bench.write_paper_config(folder, eval_payload=f"__import__('pathlib').Path('{marker}').touch() or [1024]")
    values = yaml.safe_load(path.read_text())
    for dotted, value in (changes or {}).items():
        *parents, leaf = dotted.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(values))
    return path


def test_official_style_yaml_with_base_and_eval_tag(tmp_path):
    marker = tmp_path / "evaluated"
    path = _write_paper_yaml(tmp_path, marker)
    merged = load_detectron2_yaml(path)
    assert isinstance(merged["INPUT"]["MIN_SIZE_TRAIN"], UnevaluatedTag)
    assert not marker.exists(), "the eval tag was executed"
    config = config_from_detectron2_yaml(path)
    assert not marker.exists()
    # the released Cityscapes model (method.md): R-50 (stride in 3x3), 256 channels, 6 encoder layers,
    # 9 decoder layers, 100 queries, 8 heads, FFN 2048 / 1024, 19 Cityscapes classes, GMA
    backbone = config.backbone_config
    assert (backbone.depths, backbone.hidden_sizes, backbone.embedding_size) == ([3, 4, 6, 3], [256, 512, 1024, 2048], 64)
    assert backbone.downsample_in_bottleneck is False
    assert (config.feature_size, config.mask_feature_size, config.hidden_dim) == (256, 256, 256)
    assert (config.encoder_layers, config.encoder_feedforward_dim, config.decoder_layers) == (6, 1024, 10)
    assert (config.num_queries, config.num_attention_heads, config.dim_feedforward) == (100, 8, 2048)
    assert config.global_masked_attention and config.num_labels == 19 and config.id2label[0] == "road"
    assert (config.class_weight, config.mask_weight, config.dice_weight, config.no_object_weight) == (2.0, 5.0, 5.0, 0.1)
    assert (config.contrastive_loss, config.contrastive_margin, config.contrastive_weight) == ("margin", 1.0, 1.0)
    # refinement is a processor setting: the network's config never carries it (no legacy-key warning)
    assert config.legacy_postprocessing == {}
    preprocessing = preprocessing_from_detectron2(Detectron2Config.from_file(path))
    assert preprocessing.refine and preprocessing.refine_class_ids == tuple(range(2, 11))


@pytest.mark.parametrize("frozen_bn", [False, True], ids=["bn", "frozen_bn"])
def test_paper_size_checkpoint_layout_converts_completely(tmp_path, frozen_bn):
    """The released R-50 layout (res2 shortcut 64 -> 256, 2048-channel res5 input_proj, 9 GMA layers with
    fusion_layer, ...) maps onto every key of the model the released config describes, nothing left over."""
    config = config_from_detectron2_yaml(_write_paper_yaml(tmp_path, tmp_path / "marker"))
    with torch.device("meta"):
        specs = target_specs(Mask2AnomalyForUniversalSegmentation(config))
    source = bench.paper_state_dict(fill=lambda shape: torch.empty(shape), frozen_bn=frozen_bn)
    converted = convert_state_dict(source, specs, config)
    assert set(converted) == set(specs)
    assert "model.pixel_level_module.encoder.encoder.stages.0.layers.0.shortcut.convolution.weight" in converted
    kept = sum(v.numel() for k, v in source.items() if "fusion_layer" not in k and "num_batches" not in k)
    assert sum(v.numel() for k, v in converted.items() if "num_batches" not in k) == kept


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"MODEL.RESNETS.NUM_GROUPS": 32, "MODEL.RESNETS.WIDTH_PER_GROUP": 8}, "NUM_GROUPS=32"),
        ({"MODEL.RESNETS.WIDTH_PER_GROUP": 32}, "WIDTH_PER_GROUP=32.*RES2_OUT_CHANNELS / 4 = 64"),
        ({"MODEL.RESNETS.DEPTH": 34}, "DEPTH=34"),
        ({"MODEL.RESNETS.RES5_DILATION": 2}, "RES5_DILATION=2"),
        ({"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME": "BasePixelDecoder"}, "PIXEL_DECODER_NAME='BasePixelDecoder'"),
        ({"MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME": "Other"}, "TRANSFORMER_DECODER_NAME='Other'"),
    ],
)
def test_unsupported_architectures_are_named(tmp_path, changes, message):
    path = _write_paper_yaml(tmp_path, tmp_path / "marker", changes)
    with pytest.raises(Detectron2ConfigError, match=message):
        config_from_detectron2_yaml(path)


def test_base_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    with pytest.raises(Detectron2ConfigError, match="cycle"):
        load_detectron2_yaml(tmp_path / "a.yaml")


def test_bgr_model_is_converted_to_take_rgb(tmp_path, r50_parts):
    """A model trained on BGR input (INPUT.FORMAT BGR, mean/std in BGR order, stem filters over B, G, R) must
    give, after conversion, the official RGB model's logits on the same RGB image."""
    source, _, _ = r50_parts
    bgr = dict(source)
    bgr["backbone.stem.conv1.weight"] = source["backbone.stem.conv1.weight"].flip(1)
    torch.save({"model": bgr}, tmp_path / "bgr.pth")
    values = yaml.safe_load((R50 / "config.yaml").read_text())
    values["INPUT"]["FORMAT"] = "BGR"
    values["MODEL"]["PIXEL_MEAN"] = values["MODEL"]["PIXEL_MEAN"][::-1]
    values["MODEL"]["PIXEL_STD"] = values["MODEL"]["PIXEL_STD"][::-1]
    (tmp_path / "bgr.yaml").write_text(yaml.safe_dump(values))
    out = convert_checkpoint(tmp_path / "bgr.pth", tmp_path / "bgr.yaml", tmp_path / "model")
    model = Mask2AnomalyForUniversalSegmentation.from_pretrained(out).eval()
    processor = Mask2AnomalyImageProcessor.from_pretrained(out, do_resize=False)
    ref = np.load(R50 / "img1_64x128.npz")
    image = np.asarray(Image.open(R50 / "img1_64x128.png").convert("RGB"))
    with torch.no_grad():
        out = model(pixel_values=processor(image, return_tensors="pt")["pixel_values"], output_auxiliary_logits=True)
    logits, _ = _per_layer(out)
    assert _max_diff(logits[-1], ref["pred_logits"], "pred_logits") <= LOGIT_ATOL


# ----------------------------------------------------------------------------------------------------------
# Mask2Former -> Mask2Anomaly
# ----------------------------------------------------------------------------------------------------------
def test_init_from_mask2former_copies_foreground_into_background(tmp_path):
    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1],
                            layer_type="bottleneck", out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=3,
                               num_attention_heads=4, dim_feedforward=64, num_queries=10, num_labels=5)
    source = Mask2FormerForUniversalSegmentation(config).eval()
    source.save_pretrained(tmp_path / "m2f")
    logger = logging.get_logger("modeling_mask2anomaly.modeling_mask2anomaly")
    with CaptureLogger(logger) as captured:
        model = Mask2AnomalyForUniversalSegmentation.from_mask2former(tmp_path / "m2f")
    assert logger is modeling_logger
    assert "background attention" in captured.out and "2 decoder layers" in captured.out

    assert model.config.global_masked_attention and model.config.num_labels == 5 and model.config.num_queries == 10
    weights = source.state_dict()
    for key, value in model.state_dict().items():
        origin = key.replace(".cross_attn_background.", ".cross_attn.")
        assert torch.equal(value, weights[origin]), key
    assert sum(".cross_attn_background." in k for k in model.state_dict()) == 2 * 4
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, 64, 64))
    assert out.class_queries_logits.shape == (1, 10, 6) and torch.isfinite(out.masks_queries_logits).all()


def test_console_entry_point_is_declared():
    from modeling_mask2anomaly.cli import convert_main  # the light entry point: it parses, then runs conversion's

    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == "mask2anomaly-convert"]
    assert entry.load() is convert_main
