"""Tests of the Mask2Anomaly image processor: official-fixture parity, scorers and refinement against a naive
per-pixel reference, block-wise vs whole-image rendering, flip TTA, resize rule, outlier labels, input modes."""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from shared_paths import SHARED_FIXTURES

from modeling_mask2anomaly.image_processing_mask2anomaly import (
    Mask2AnomalyImageProcessor,
    get_resize_output_size,
    load_image,
    to_rgb_uint8,
)
from modeling_mask2anomaly.inference import iter_predict_anomaly, predict_anomaly

FIXTURES = SHARED_FIXTURES
R50 = FIXTURES / "official_r50_small"
SWIN = FIXTURES / "official_swin_small"
needs_fixtures = pytest.mark.skipif(not R50.is_dir(), reason="official fixtures are not mounted on this machine")


def _outputs(class_logits, mask_logits) -> SimpleNamespace:
    as_batch = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))[None]  # noqa: E731
    return SimpleNamespace(class_queries_logits=as_batch(class_logits), masks_queries_logits=as_batch(mask_logits))


# ------------------------------------------------------------------------------------- official parity


def _fixture_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("img*.npz")) if folder.is_dir() else []


@needs_fixtures
@pytest.mark.parametrize("path", _fixture_files(R50) + _fixture_files(SWIN), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_post_processing_matches_official(path: Path):
    data = dict(np.load(path))
    h, w = (int(v) for v in data["image_size"])
    classes_key = next(k for k in data if k.startswith("sem_seg_") and k != "sem_seg_refine")
    processor = Mask2AnomalyImageProcessor(do_resize=False)
    view = _outputs(data["pred_logits"], data["pred_masks"])
    flipped = _outputs(data["flip_pred_logits"], data["flip_pred_masks"])
    target = [(h, w)]

    scores = processor.post_process_semantic_segmentation(view, target, return_segmentation_scores=True)[0]
    np.testing.assert_allclose(scores.segmentation_scores.numpy(), data[classes_key], rtol=0, atol=1e-5)
    assert scores.segmentation.shape == (h, w)
    # the argmax can only differ where two official channels are closer than the tolerance
    official = data[classes_key]
    top2 = np.sort(official, axis=0)[-2:]
    decided = top2[1] - top2[0] > 1e-5
    assert np.array_equal(scores.segmentation.numpy()[decided], official.argmax(0)[decided])

    # pixels whose official refinement score lies within 3e-6 of 0.5 may flip either way (see the README)
    refine_channels = data["sem_seg_refine"]
    undecided = (np.abs(refine_channels.max(0) - 0.5) < 3e-6) if len(refine_channels) else np.zeros((h, w), bool)
    expected = {
        "anomaly_noref": processor.post_process_anomaly_segmentation(view, target, refine=False),
        "anomaly_ref": processor.post_process_anomaly_segmentation(view, target),
        "anomaly_ref_flip": processor.post_process_anomaly_segmentation(view, target, flipped_outputs=flipped),
        "anomaly_noref_flip": processor.post_process_anomaly_segmentation(
            view, target, refine=False, flipped_outputs=flipped
        ),
    }
    if "anomaly_ref_ge1" in data:
        expected["anomaly_ref_ge1"] = processor.post_process_anomaly_segmentation(view, target, refine_min_queries=1)
    for key, (result,) in expected.items():
        assert result.dtype == torch.float32 and result.shape == (h, w), key
        diff = np.abs(result.numpy() - data[key])
        assert (diff[~undecided] <= 1e-4).all(), f"{key}: worst difference {diff[~undecided].max()}"
    # the refinement really changed the map for these views (n_refine > 1), so the check above means something
    if int(data["n_refine"]) > 1:
        assert (data["anomaly_ref"] != data["anomaly_noref"]).any()


@needs_fixtures
@pytest.mark.parametrize("path", _fixture_files(R50) + _fixture_files(SWIN)[:1], ids=lambda p: p.stem)
def test_preprocessing_matches_official_input(path: Path):
    data = np.load(path)
    processor = Mask2AnomalyImageProcessor(do_resize=False)
    inputs = processor(data["image_rgb_uint8"], return_tensors="pt")
    np.testing.assert_allclose(inputs["pixel_values"][0].numpy(), data["input_padded"], rtol=0, atol=1e-5)
    h, w = data["image_size"]
    mask = inputs["pixel_mask"][0].numpy()
    assert mask.shape == data["input_padded"].shape[1:]
    assert mask[:h, :w].all() and mask.sum() == h * w


# ------------------------------------------------------------------------------------- naive reference


def _bilinear_naive(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Per-pixel bilinear resize, align_corners=False (PyTorch's convention), float64, loops over pixels."""
    in_h, in_w = image.shape

    def source(dst: int, in_size: int, out_size: int) -> tuple[int, int, float]:
        s = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
        lo = min(int(math.floor(s)), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        return lo, hi, s - lo

    out = np.zeros((out_h, out_w))
    for y in range(out_h):
        y0, y1, ly = source(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, lx = source(x, in_w, out_w)
            top = (1 - lx) * image[y0, x0] + lx * image[y0, x1]
            bottom = (1 - lx) * image[y1, x0] + lx * image[y1, x1]
            out[y, x] = (1 - ly) * top + ly * bottom
    return out


REFINED_SCORE = {"mask2anomaly": 0.0, "eam": 0.0, "msp": 0.0, "rba": -1.0, "max_logit": -10.0, "energy": -10.0}


def _naive_anomaly(class_logits, mask_logits, valid, out_size, scorer, refine_ids, threshold, min_queries):
    """Independent float64 re-derivation of the documented scorers and refinement, loops over queries."""
    class_logits = np.asarray(class_logits, np.float64)
    e = np.exp(class_logits - class_logits.max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    num_queries, num_classes = probs.shape[0], probs.shape[1] - 1
    ph, pw = 4 * mask_logits.shape[1], 4 * mask_logits.shape[2]
    up = [_bilinear_naive(mask_logits[q].astype(np.float64), ph, pw) for q in range(num_queries)]
    prob_maps = [1 / (1 + np.exp(-u)) for u in up]

    def finish(channel):  # crop the padded-resolution channel, then resize it to the output size
        return _bilinear_naive(channel[: valid[0], : valid[1]], *out_size)

    S = np.stack([finish(sum(probs[q, c] * prob_maps[q] for q in range(num_queries))) for c in range(num_classes)])
    if scorer == "mask2anomaly":
        score = 1 - S.max(0)
    elif scorer == "rba":
        score = -np.tanh(S).sum(0)
    elif scorer == "eam":
        score = 1 - finish(sum(probs[q, :num_classes].max() * prob_maps[q] for q in range(num_queries)))
    elif scorer == "msp":
        score = 1 - S.max(0) / S.sum(0)
    else:
        L = np.stack([finish(sum(probs[q, c] * up[q] for q in range(num_queries))) for c in range(num_classes)])
        if scorer == "max_logit":
            score = -L.max(0)
        else:
            top = L.max(0)
            score = -(top + np.log(np.exp(L - top).sum(0)))
    kept = [q for q in range(num_queries) if probs[q].max() > threshold and probs[q].argmax() in (refine_ids or ())]
    R = None
    if refine_ids is not None and len(kept) >= min_queries:
        R = np.max([finish(probs[q].max() * prob_maps[q]) for q in kept], axis=0)
        # official a * (R < 0.5) for the scores on [0, 1]; the low end of the colour scale for the others, whose 0
        # is their most anomalous value (rba) or mid-scale (max_logit, energy)
        score = np.where(R < 0.5, score, REFINED_SCORE[scorer])
    return score, S, R


def _random_case(seed: int, num_queries: int = 6, num_classes: int = 4, mask_hw=(3, 4)):
    gen = np.random.default_rng(seed)
    class_logits = gen.normal(0, 1.5, (num_queries, num_classes + 1))
    # two confident queries of refinement classes 1 and 2, one confident of class 0 (not a refinement class)
    class_logits[0, 1] += 12
    class_logits[1, 2] += 12
    class_logits[2, 0] += 12
    mask_logits = gen.normal(0, 3, (num_queries, *mask_hw))
    # query 0 covers the left half and query 1 one corner, so R crosses 0.5 inside the image
    mask_logits[0, :, :2] += 6
    mask_logits[0, :, 2:] -= 6
    mask_logits[1] -= 6
    mask_logits[1, 0, 0] += 12
    return class_logits.astype(np.float32), mask_logits.astype(np.float32)


@pytest.mark.parametrize("scorer", ["mask2anomaly", "rba", "eam", "msp", "max_logit", "energy"])
@pytest.mark.parametrize("out_size", [(7, 9), (13, 21)], ids=["down", "up"])
def test_scorers_and_refinement_match_naive_reference(scorer, out_size):
    class_logits, mask_logits = _random_case(seed=len(scorer) + out_size[0])
    valid = (10, 14)  # un-padded part of the 12 x 16 padded grid
    processor = Mask2AnomalyImageProcessor(refine_class_ids=[1, 2], anomaly_scorer=scorer)
    outputs = _outputs(class_logits, mask_logits)
    for refine, min_queries in ((False, 2), (True, 2), (True, 3)):
        result = processor.post_process_anomaly_segmentation(
            outputs, [out_size], image_sizes=[valid], refine=refine, refine_min_queries=min_queries
        )[0]
        expected, _, R = _naive_anomaly(
            class_logits, mask_logits, valid, out_size, scorer, [1, 2] if refine else None, 0.95, min_queries
        )
        assert result.shape == out_size and result.dtype == torch.float32
        ok = np.ones(out_size, bool) if R is None else np.abs(R - 0.5) > 1e-5
        np.testing.assert_allclose(result.numpy()[ok], expected[ok], rtol=0, atol=2e-5)
        if refine and min_queries == 2:
            assert R is not None and (R >= 0.5).any() and (R < 0.5).any(), "the case must exercise refinement"


@pytest.mark.parametrize("scorer", ["mask2anomaly", "rba", "eam", "msp", "max_logit", "energy"])
def test_one_pass_equals_separate_anomaly_and_semantic_post_processing(scorer):
    """post_process_anomaly_and_semantic gives bit for bit the maps of the two separate methods (and max_c S_c of
    the class channels), with and without refinement and flipped outputs, on a memory budget that forces blocks."""
    case, flipped_case = _random_case(seed=len(scorer)), _random_case(seed=len(scorer) + 7)
    outputs = _outputs(*case)
    flipped = _outputs(*flipped_case)
    processor = Mask2AnomalyImageProcessor(refine_class_ids=[1, 2], anomaly_scorer=scorer)
    sizes = dict(target_sizes=[(13, 21)], image_sizes=[(10, 14)], memory_budget_mb=0.002)
    refined_somewhere = False
    for refine in (False, True):
        for flip in (None, flipped):
            (one,) = processor.post_process_anomaly_and_semantic(outputs, flipped_outputs=flip, refine=refine,
                                                                 **sizes)
            (anomaly,) = processor.post_process_anomaly_segmentation(outputs, flipped_outputs=flip, refine=refine,
                                                                      **sizes)
            (semantic,) = processor.post_process_semantic_segmentation(outputs, return_segmentation_scores=True,
                                                                       **sizes)
            assert torch.equal(one.anomaly_map, anomaly)
            assert torch.equal(one.semantic_map, semantic.segmentation)
            assert torch.equal(one.class_confidence, semantic.segmentation_scores.max(dim=0).values)
            assert one.anomaly_map.dtype == torch.float32 and one.semantic_map.dtype == torch.int64
            if refine:
                (plain,) = processor.post_process_anomaly_segmentation(outputs, flipped_outputs=flip, refine=False,
                                                                        **sizes)
                refined_somewhere |= bool((plain != anomaly).any())
    assert refined_somewhere, "the case must exercise refinement"


def test_semantic_map_and_class_scores_match_naive_reference():
    class_logits, mask_logits = _random_case(seed=3)
    processor = Mask2AnomalyImageProcessor()
    out = processor.post_process_semantic_segmentation(
        _outputs(class_logits, mask_logits), [(11, 15)], image_sizes=[(9, 13)], return_segmentation_scores=True
    )[0]
    _, S, _ = _naive_anomaly(class_logits, mask_logits, (9, 13), (11, 15), "mask2anomaly", None, 0.95, 2)
    np.testing.assert_allclose(out.segmentation_scores.numpy(), S, rtol=0, atol=1e-5)
    top2 = np.sort(S, axis=0)[-2:]
    decided = top2[1] - top2[0] > 1e-5
    assert np.array_equal(out.segmentation.numpy()[decided], S.argmax(0)[decided])


def test_refinement_uses_softmax_over_all_columns_and_min_queries_rule():
    # Query 0 is confident in a refinement class only if the no-object column is ignored: it must not be kept.
    num_classes = 3
    class_logits = np.full((3, num_classes + 1), -20.0, np.float32)
    class_logits[0, [1, num_classes]] = 10.0  # 50/50 between class 1 and no-object: score 0.5
    class_logits[1, 1] = 10.0  # confident class 1
    class_logits[2, 2] = 10.0  # confident class 2
    mask_logits = np.full((3, 2, 2), 8.0, np.float32)  # every mask covers everything
    processor = Mask2AnomalyImageProcessor(refine_class_ids=[1, 2], refine_min_queries=2)
    outputs = _outputs(class_logits, mask_logits)
    refined = processor.post_process_anomaly_segmentation(outputs)[0]
    unrefined = processor.post_process_anomaly_segmentation(outputs, refine=False)[0]
    assert (unrefined != 0).all() and (refined == 0).all()
    # with only class 1 as refinement class a single query is kept: no refinement under the official rule ...
    processor.refine_class_ids = [1]
    assert torch.equal(processor.post_process_anomaly_segmentation(outputs)[0], unrefined)
    # ... but refinement with refine_min_queries=1
    assert (processor.post_process_anomaly_segmentation(outputs, refine_min_queries=1)[0] == 0).all()


# ------------------------------------------------------------------------------------- block-wise rendering


def _whole_image_reference(class_logits, mask_logits, valid, out_size):
    """All masks upsampled at once with F.interpolate, as the official semantic_inference does."""
    probs = torch.as_tensor(class_logits).softmax(-1)
    masks = torch.as_tensor(mask_logits)[None]
    up = F.interpolate(masks, size=(4 * masks.shape[-2], 4 * masks.shape[-1]), mode="bilinear", align_corners=False)
    S = torch.einsum("qc,qhw->chw", probs[:, :-1], up[0].sigmoid())[:, : valid[0], : valid[1]]
    S = F.interpolate(S[None], size=out_size, mode="bilinear", align_corners=False)[0]
    return 1 - S.max(0).values, S.argmax(0)


@pytest.mark.parametrize("out_size", [(50, 90), (160, 251)], ids=["down", "up"])
def test_block_wise_equals_whole_image(out_size):
    gen = np.random.default_rng(7)
    class_logits = gen.normal(0, 3, (30, 20)).astype(np.float32)
    mask_logits = gen.normal(0, 4, (30, 20, 32)).astype(np.float32)
    outputs = _outputs(class_logits, mask_logits)
    processor = Mask2AnomalyImageProcessor(refine=False)
    valid = [(75, 125)]
    # 0.5 MiB gives blocks of a few rows here; 1e6 MiB one block
    small = processor.post_process_anomaly_segmentation(outputs, [out_size], image_sizes=valid, memory_budget_mb=0.5)
    whole = processor.post_process_anomaly_segmentation(outputs, [out_size], image_sizes=valid, memory_budget_mb=1e6)
    reference, reference_semantic = _whole_image_reference(class_logits, mask_logits, valid[0], out_size)
    assert (small[0] - whole[0]).abs().max() <= 1e-5
    assert (small[0] - reference).abs().max() <= 1e-5
    semantic = processor.post_process_semantic_segmentation(outputs, [out_size], image_sizes=valid, memory_budget_mb=0.5)
    assert (semantic[0] != reference_semantic).float().mean() < 1e-3  # only near-ties may differ


def test_target_sizes_derive_the_resized_size_and_none_gives_padded_maps():
    # an original 300 x 500 image is resized to 1024 x 1707 and padded to 1024 x 1728 (mask grid 256 x 432)
    processor = Mask2AnomalyImageProcessor()
    assert processor.processed_size((300, 500)) == (1024, 1707)
    gen = np.random.default_rng(0)
    class_logits = gen.normal(0, 3, (5, 4)).astype(np.float32)
    mask_logits = gen.normal(0, 3, (5, 256, 432)).astype(np.float32)
    outputs = _outputs(class_logits, mask_logits)
    derived = processor.post_process_anomaly_segmentation(outputs, [(300, 500)], refine=False)[0]
    explicit = processor.post_process_anomaly_segmentation(
        outputs, [(300, 500)], image_sizes=[(1024, 1707)], refine=False
    )[0]
    reference, _ = _whole_image_reference(class_logits, mask_logits, (1024, 1707), (300, 500))
    assert derived.shape == (300, 500) and torch.equal(derived, explicit)
    assert (derived - reference).abs().max() <= 1e-5
    padded = processor.post_process_anomaly_segmentation(outputs, refine=False)[0]
    assert padded.shape == (1024, 1728)
    with pytest.raises(ValueError, match="exceeds the padded input size"):
        processor.post_process_anomaly_segmentation(outputs, [(300, 600)])
    with pytest.raises(ValueError, match="target_sizes"):
        processor.post_process_anomaly_segmentation(outputs, [(300, 500), (300, 500)])
    with pytest.raises(ValueError, match="'nope'"):
        processor.post_process_anomaly_segmentation(outputs, scorer="nope")


# ------------------------------------------------------------------------------------- flip TTA, end to end


class _ImageDependentStub(torch.nn.Module):
    """Logits that depend on the image and are not flip-symmetric: masks from a 1x1 conv of stride-4 pooling."""

    def __init__(self, num_queries: int = 5, num_classes: int = 11):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.mask_proj = torch.nn.Parameter(torch.randn(num_queries, 3, generator=gen) * 2)
        self.class_proj = torch.nn.Parameter(torch.randn(num_queries, num_classes + 1, 3, generator=gen) * 4)
        self.class_bias = torch.nn.Parameter(torch.randn(num_queries, num_classes + 1, generator=gen) * 3)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        # one image at a time: torch's batched reductions and matmuls may round differently with the batch size
        # (seen with torch 2.13 for a batch of 3), and the tests ask whether the *drivers'* batching changes results
        views = [self._forward_batch(pixel_values[i : i + 1]) for i in range(pixel_values.shape[0])]
        return SimpleNamespace(class_queries_logits=torch.cat([v.class_queries_logits for v in views]),
                               masks_queries_logits=torch.cat([v.masks_queries_logits for v in views]))

    def _forward_batch(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        pooled = F.avg_pool2d(pixel_values, 4)  # (B, 3, H/4, W/4)
        ramp = torch.linspace(-2, 2, pooled.shape[-1])  # breaks the left-right symmetry
        masks = torch.einsum("qc,bchw->bqhw", self.mask_proj, pooled) + ramp
        summary = pixel_values.mean(dim=(2, 3))  # (B, 3)
        classes = torch.einsum("qkc,bc->bqk", self.class_proj, summary) + self.class_bias
        return SimpleNamespace(class_queries_logits=classes, masks_queries_logits=masks)


def test_predict_anomaly_flip_tta_matches_manual_flipping():
    gen = np.random.default_rng(1)
    images = [gen.integers(0, 256, (37, 53, 3), dtype=np.uint8), gen.integers(0, 256, (20, 70, 3), dtype=np.uint8)]
    processor = Mask2AnomalyImageProcessor(size={"shortest_edge": 48, "longest_edge": 96})
    model = _ImageDependentStub()
    # one image per forward pass, as the official script: batching pads images to a common size, which changes
    # what a model sees (checked below with same-size images)
    results = predict_anomaly(model, processor, iter(images), batch_size=1)
    assert len(results) == 2
    for image, result in zip(images, results):
        size = [image.shape[:2]]
        views = []
        for array in (image, image[:, ::-1]):
            out = model(processor(np.ascontiguousarray(array), return_tensors="pt")["pixel_values"])
            views.append(processor.post_process_anomaly_segmentation(out, size)[0].numpy())
        expected = (views[0] + np.fliplr(views[1])) / 2
        np.testing.assert_allclose(result.anomaly_map, expected, rtol=0, atol=1e-6)
        assert not np.allclose(views[0], np.fliplr(views[1]), atol=1e-3), "the stub must not be flip-symmetric"
        out = model(processor(image, return_tensors="pt")["pixel_values"])
        semantic = processor.post_process_semantic_segmentation(out, size)[0].numpy()
        assert result.semantic_map.dtype == np.uint8 and np.array_equal(result.semantic_map, semantic)
        assert result.anomaly_map.dtype == np.float32 and result.anomaly_map.shape == image.shape[:2]
    same_size = [images[0], images[0][::-1].copy(), images[0][:, ::-1].copy()]
    batched = predict_anomaly(model, processor, same_size, batch_size=2)
    for one, many in zip(predict_anomaly(model, processor, same_size, batch_size=1), batched):
        np.testing.assert_allclose(one.anomaly_map, many.anomaly_map, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(one.semantic_map, many.semantic_map)
    without = next(iter_predict_anomaly(model, processor, images[0], flip_tta=False))
    out = model(processor(images[0], return_tensors="pt")["pixel_values"])
    np.testing.assert_array_equal(
        without.anomaly_map, processor.post_process_anomaly_segmentation(out, [images[0].shape[:2]])[0].numpy()
    )


class _RecordingStub(_ImageDependentStub):
    """The stub, recording the shape of every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        self.shapes.append(tuple(pixel_values.shape))
        return super().forward(pixel_values)


def _stub_reference(model, processor, image: np.ndarray, do_resize: bool = True, flip: bool = True) -> np.ndarray:
    """The anomaly map of one image on its own, from the model outputs and post-processing called here."""
    size = [image.shape[:2]]
    image_sizes = None if do_resize else size
    views = []
    for array in (image, image[:, ::-1])[: 2 if flip else 1]:
        pixel_values = processor(np.ascontiguousarray(array), do_resize=do_resize, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = _ImageDependentStub.forward(model, pixel_values)
        views.append(processor.post_process_anomaly_segmentation(out, size, image_sizes=image_sizes)[0].numpy())
    return (views[0] + np.fliplr(views[1])) / 2 if flip else views[0]


def test_predict_anomaly_batches_only_images_of_one_processed_size():
    gen = np.random.default_rng(3)
    shapes = [(37, 53), (20, 70), (74, 106), (37, 53), (50, 50), (50, 50), (50, 50), (37, 53), (20, 70)]
    images = [gen.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]
    processor = Mask2AnomalyImageProcessor(size={"shortest_edge": 48, "longest_edge": 96})
    # processed sizes: 48x69 (both 37x53 and 74x106), 27x96, 48x48
    assert processor.processed_size((74, 106)) == processor.processed_size((37, 53)) != processor.processed_size((20, 70))
    model = _RecordingStub()
    single = predict_anomaly(model, processor, images, batch_size=1)
    model.shapes.clear()
    read = []

    def lazily():
        for index, image in enumerate(images):
            read.append(index)
            yield image

    stream = iter_predict_anomaly(model, processor, lazily(), batch_size=3)
    first = next(stream)
    assert read == [0, 1], "the first batch (one image) goes out once the next image's size differs"
    batched = [first, *stream]
    # forward passes (plain and flipped view) of [A], [B], [A', A], [C, C, C], [A], [B]: never mixed sizes
    assert [shape[0] for shape in model.shapes] == [1, 1, 1, 1, 2, 2, 3, 3, 1, 1, 1, 1]
    assert len(batched) == len(images)
    for image, one, many in zip(images, single, batched):
        assert many.anomaly_map.shape == image.shape[:2]
        np.testing.assert_array_equal(many.anomaly_map, one.anomaly_map)
        np.testing.assert_array_equal(many.semantic_map, one.semantic_map)
        np.testing.assert_allclose(many.anomaly_map, _stub_reference(model, processor, image), rtol=0, atol=1e-6)


def test_predict_anomaly_do_resize_overrides_the_processor():
    image = np.random.default_rng(4).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    processor = Mask2AnomalyImageProcessor(size={"shortest_edge": 48, "longest_edge": 96})
    model = _RecordingStub()
    (native,) = predict_anomaly(model, processor, [image], do_resize=False)
    assert processor.do_resize is True, "the processor is not changed"
    assert model.shapes[0] == (1, 3, 64, 64), "37x53 kept, padded to a multiple of 32"
    np.testing.assert_allclose(native.anomaly_map, _stub_reference(model, processor, image, do_resize=False),
                               rtol=0, atol=1e-6)
    (resized,) = predict_anomaly(model, processor, [image])
    assert np.abs(resized.anomaly_map - native.anomaly_map).max() > 1e-3, "do_resize=False changed nothing"
    native_processor = Mask2AnomalyImageProcessor(size={"shortest_edge": 48, "longest_edge": 96}, do_resize=False)
    (forced,) = predict_anomaly(model, native_processor, [image], do_resize=True)
    np.testing.assert_array_equal(forced.anomaly_map, resized.anomaly_map)


def test_predict_anomaly_with_a_tiny_mask2former():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=32, num_queries=6, num_labels=11)
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).train()
    processor = Mask2AnomalyImageProcessor(do_resize=False, flip_tta=False)
    image = np.random.default_rng(2).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    (result,) = predict_anomaly(model, processor, [Image.fromarray(image)])
    assert model.training, "predict_anomaly must restore the model's mode"
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=processor(image, return_tensors="pt")["pixel_values"])
    expected = processor.post_process_anomaly_segmentation(out, [(45, 70)])[0].numpy()
    np.testing.assert_allclose(result.anomaly_map, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- pre-processing


def _detectron2_output_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    # detectron2 ResizeShortestEdge.get_output_shape, re-typed from its documented algorithm
    scale = short * 1.0 / min(h, w)
    newh, neww = (short * 1.0, scale * w) if h < w else (scale * h, short * 1.0)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def test_resize_rule_matches_detectron2():
    gen = np.random.default_rng(0)
    sizes = [(1024, 2048), (720, 1280), (1080, 1920), (5, 7), (7, 5), (1, 3000), (3000, 1), (600, 600), (1023, 2049)]
    sizes += [tuple(int(v) for v in gen.integers(1, 4000, 2)) for _ in range(3000)]
    for h, w in sizes:
        for short, longest in ((1024, 2048), (800, 1333), (512, 4096)):
            assert get_resize_output_size(h, w, short, longest) == _detectron2_output_shape(h, w, short, longest), (
                h, w, short, longest)
    processor = Mask2AnomalyImageProcessor()
    image = gen.integers(0, 256, (75, 141, 3), dtype=np.uint8)
    pixels = processor(image, return_tensors="np")["pixel_values"][0]
    new_h, new_w = _detectron2_output_shape(75, 141, 1024, 2048)
    assert pixels.shape == (3, 1024, 1952)  # 1925 wide, padded to a multiple of 32
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR)).astype(np.float32)
    mean = np.array([123.675, 116.28, 103.53], np.float32)
    std = np.array([58.395, 57.12, 57.375], np.float32)
    np.testing.assert_allclose(pixels[:, :new_h, :new_w], ((resized - mean) / std).transpose(2, 0, 1), atol=1e-5)
    assert (pixels[:, :, new_w:] == 0).all()


def test_small_images_and_batches_are_padded_to_the_stride():
    processor = Mask2AnomalyImageProcessor(do_resize=False)
    gen = np.random.default_rng(0)
    batch = processor([gen.integers(0, 256, (5, 7, 3), dtype=np.uint8),
                       gen.integers(0, 256, (40, 33, 3), dtype=np.uint8)], return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["pixel_mask"][0].sum() == 35 and batch["pixel_mask"][1].sum() == 40 * 33


def test_outlier_labels_and_class_masks():
    gen = np.random.default_rng(0)
    label_map = gen.integers(0, 4, (30, 45)).astype(np.uint8)
    label_map[3:9, 5:20] = 254
    label_map[20:25] = 255
    image = gen.integers(0, 256, (30, 45, 3), dtype=np.uint8)
    processor = Mask2AnomalyImageProcessor(do_resize=False)
    out = processor(image, segmentation_maps=Image.fromarray(label_map), return_tensors="pt")
    outliers = out["outlier_labels"][0].numpy()
    assert outliers.shape == (32, 64) and out["outlier_labels"].dtype == torch.int64
    expected = np.zeros((32, 64), np.int64)
    expected[:30, :45] = label_map == 254
    assert np.array_equal(outliers, expected)
    classes = out["class_labels"][0].tolist()
    masks = out["mask_labels"][0].numpy()
    assert classes == [0, 1, 2, 3]
    for k, c in enumerate(classes):
        expected_mask = np.zeros((32, 64), bool)
        expected_mask[:30, :45] = label_map == c
        assert np.array_equal(masks[k].astype(bool), expected_mask)

    # with do_reduce_labels, 0 is void, 1.. shift down, and 254 / 255 keep their meaning
    reduced = processor(image, segmentation_maps=label_map, do_reduce_labels=True, return_tensors="pt")
    assert reduced["class_labels"][0].tolist() == [0, 1, 2]
    assert torch.equal(reduced["outlier_labels"], out["outlier_labels"])
    assert np.array_equal(reduced["mask_labels"][0][0].numpy()[:30, :45].astype(bool), label_map == 1)

    # resizing: labels resized nearest with the image's size rule, outliers follow
    resizing = Mask2AnomalyImageProcessor(size={"shortest_edge": 64, "longest_edge": 200})
    out = resizing(image, segmentation_maps=label_map, return_tensors="np")
    new_h, new_w = _detectron2_output_shape(30, 45, 64, 200)
    nearest = np.asarray(Image.fromarray(label_map).resize((new_w, new_h), Image.NEAREST))
    assert out["outlier_labels"].shape == (1, 64, 96)
    assert np.array_equal(out["outlier_labels"][0][:new_h, :new_w], (nearest == 254).astype(np.int64))
    assert out["outlier_labels"][0][:, new_w:].sum() == 0
    with pytest.raises(ValueError, match="size"):
        processor(image, segmentation_maps=label_map[:20])


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_modes_and_array_layouts():
    gen = np.random.default_rng(0)
    rgb = gen.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    gray = gen.integers(0, 256, (6, 9), dtype=np.uint8)
    alpha = gen.integers(0, 256, (6, 9), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(Image.fromarray(gray)), np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(to_rgb_uint8(Image.fromarray(np.dstack([gray, alpha]), "LA")),
                                  np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(to_rgb_uint8(Image.fromarray(np.dstack([rgb, alpha]))), rgb)
    palette_image = Image.fromarray(gray % 4, "P")
    palette = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120] + [0] * (768 - 12)
    palette_image.putpalette(palette)
    np.testing.assert_array_equal(to_rgb_uint8(palette_image), np.asarray(palette[:12]).reshape(4, 3)[gray % 4])
    sixteen = (gray.astype(np.uint16) * 257)
    image16 = Image.frombytes("I;16", (9, 6), sixteen.tobytes())
    np.testing.assert_array_equal(to_rgb_uint8(image16), np.repeat(gray[..., None], 3, -1))
    cyan = Image.new("CMYK", (3, 2), (255, 0, 0, 0))
    assert (to_rgb_uint8(cyan) == np.array([0, 255, 255])).all()
    # arrays and tensors: HxW, HxWx1, HxWx4, CHW, floats in [0, 1], uint16
    np.testing.assert_array_equal(to_rgb_uint8(gray), np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(to_rgb_uint8(gray[..., None]), np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(to_rgb_uint8(np.dstack([rgb, alpha])), rgb)
    np.testing.assert_array_equal(to_rgb_uint8(torch.from_numpy(rgb).permute(2, 0, 1)), rgb)
    np.testing.assert_array_equal(to_rgb_uint8(rgb.astype(np.float32) / 255), rgb)
    np.testing.assert_array_equal(to_rgb_uint8(rgb.astype(np.uint16) * 257), rgb)
    # every mode goes through the processor
    processor = Mask2AnomalyImageProcessor(do_resize=False)
    batch = processor([Image.fromarray(gray), image16, cyan.resize((9, 6)), torch.from_numpy(rgb)], return_tensors="pt")
    assert batch["pixel_values"].shape == (4, 3, 32, 32)


def test_bad_inputs_name_the_value(tmp_path):
    processor = Mask2AnomalyImageProcessor()
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4, 5, 6\)"):
        processor(np.zeros((2, 3, 4, 5, 6), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(6, 5, 7\)"):
        to_rgb_uint8(np.zeros((6, 5, 7), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_uint8(np.full((4, 5), np.nan, np.float32))
    with pytest.raises(ValueError, match="dict"):
        to_rgb_uint8({"image": 1})
    with pytest.raises(ValueError, match="URL"):
        processor("https://example.com/image.png")
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match="missing.png.*no such file"):
        processor(str(missing))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png.*empty"):
        load_image(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg.*not an image"):
        load_image(text)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3),
                                                                                      dtype=np.uint8)))[:300])
    with pytest.raises(ValueError, match="truncated.png.*truncated"):
        load_image(truncated)
    with pytest.raises(ValueError, match="anomaly_scorer='bogus'"):
        Mask2AnomalyImageProcessor(anomaly_scorer="bogus")


def test_load_image_names_the_pixel_limit(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.new("RGB", (12, 10), (1, 2, 3)).save(path)  # 120 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL refuses more than 2 * 50 pixels
    with pytest.raises(ValueError) as caught:
        load_image(path)
    message = str(caught.value)
    assert "wide.png" in message and "120 pixels" in message
    assert "MAX_IMAGE_PIXELS" in message and "= 50" in message
    assert "MAX_IMAGE_PIXELS = 120" in message, "says which limit would read the file"
    assert "truncated" not in message and "corrupt" not in message
    assert isinstance(caught.value.__cause__, Image.DecompressionBombError)

    # between the limit and twice the limit PIL only warns: the image is read, unless warnings are errors
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.warns(Image.DecompressionBombWarning):
        assert load_image(path).size == (12, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ValueError, match=r"wide\.png.*120 pixels.*MAX_IMAGE_PIXELS = 100"):
            load_image(path)
    # following the advice reads it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 120)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert np.array_equal(np.asarray(load_image(path)), np.full((10, 12, 3), (1, 2, 3), np.uint8))


def test_load_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    image.paste((10, 200, 10), (0, 0, 10, 20))  # green band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (40, 20, 3)
    assert loaded[2, 10, 1] > 150 and loaded[-3, 10, 0] > 150  # the left band is now at the top
    processed = Mask2AnomalyImageProcessor(do_resize=False)(str(path), return_tensors="np")
    assert processed["pixel_mask"][0].sum() == 40 * 20 and processed["pixel_values"].shape == (1, 3, 64, 32)


# ------------------------------------------------------------------------------------- saving and config


def test_save_load_round_trip_and_model_config(tmp_path):
    from modeling_mask2anomaly.configuration_mask2anomaly import Mask2AnomalyConfig

    config = Mask2AnomalyConfig.tiny(refine=False, anomaly_scorer="rba", flip_tta=False, refine_class_ids=[3, 4],
                                     refine_score_threshold=0.9, anomaly_threshold=0.25)
    processor = Mask2AnomalyImageProcessor.from_model_config(config, do_resize=False)
    assert (processor.refine, processor.anomaly_scorer, processor.flip_tta) == (False, "rba", False)
    assert processor.refine_class_ids == [3, 4] and processor.refine_score_threshold == 0.9
    assert processor.anomaly_threshold == 0.25 and processor.outlier_label == 254 and processor.ignore_index == 255
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "Mask2AnomalyImageProcessor" and saved["anomaly_scorer"] == "rba"
    loaded = Mask2AnomalyImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert Mask2AnomalyImageProcessor.from_pretrained(tmp_path, refine=True).refine is True
    defaults = Mask2AnomalyImageProcessor()
    assert dict(defaults.size) == {**dict(defaults.size), "shortest_edge": 1024, "longest_edge": 2048}
    assert defaults.refine and defaults.anomaly_scorer == "mask2anomaly" and defaults.refine_min_queries == 2
