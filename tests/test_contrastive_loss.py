"""The mask contrastive loss against the official code's values and a naive per-pixel reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from shared_paths import SHARED_FIXTURES

from modeling_mask2anomaly import mask_contrastive_loss

FIXTURES = SHARED_FIXTURES / "official_r50_small"


def naive_loss(class_logits, mask_logits, outlier_labels, margin=1.0, form="margin", label_sizes=None) -> float:
    """Per-pixel loops in float64: S_c, the score -max_c S_c, align_corners=True bilinear resize (onto image b's
    `label_sizes[b]`, its labels being the top-left corner of `outlier_labels[b]`), the loss."""
    cl = class_logits.double().numpy()
    ml = mask_logits.double().numpy()
    labels = outlier_labels.numpy()
    batch, queries, h, w = ml.shape
    inlier_terms, outlier_terms = [], []
    for b in range(batch):
        big_h, big_w = labels.shape[1:] if label_sizes is None else label_sizes[b]
        e = np.exp(cl[b] - cl[b].max(-1, keepdims=True))
        probs = (e / e.sum(-1, keepdims=True))[:, :-1]
        score = np.zeros((h, w))
        for y in range(h):
            for x in range(w):
                s = [sum(probs[q, c] / (1 + math.exp(-ml[b, q, y, x])) for q in range(queries))
                     for c in range(probs.shape[1])]
                score[y, x] = -max(s)
        for i in range(big_h):
            for j in range(big_w):
                fy = i * (h - 1) / (big_h - 1) if big_h > 1 else 0.0
                fx = j * (w - 1) / (big_w - 1) if big_w > 1 else 0.0
                y0, x0 = int(math.floor(fy)), int(math.floor(fx))
                y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
                ty, tx = fy - y0, fx - x0
                v = ((1 - ty) * ((1 - tx) * score[y0, x0] + tx * score[y0, x1])
                     + ty * ((1 - tx) * score[y1, x0] + tx * score[y1, x1]))
                if labels[b, i, j] == 0:
                    inlier_terms.append(v)
                elif labels[b, i, j] == 1:
                    outlier_terms.append(v)
    inl, out = np.array(inlier_terms), np.array(outlier_terms)
    if form == "margin":
        loss = np.mean(inl**2)
        if out.size:
            loss += np.mean(np.maximum(margin - out, 0.0) ** 2)
    else:
        bce = lambda z, t: np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z))))  # noqa: E731
        loss = bce(inl, 0.0)
        if out.size:
            loss += bce(out, 1.0)
    return 0.5 * loss


def _random_case(seed, with_outliers=True, shape=(2, 5, 4, 6, 9, 13)):
    batch, queries, h, w, big_h, big_w = shape
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(batch, queries, 6, generator=g) * 3
    mask_logits = torch.randn(batch, queries, h, w, generator=g) * 3
    labels = torch.zeros(batch, big_h, big_w, dtype=torch.long)
    labels[torch.rand(batch, big_h, big_w, generator=g) < 0.15] = 255
    if with_outliers:
        labels[0, 2:5, 3:8] = 1
    return class_logits, mask_logits, labels


@pytest.mark.parametrize("form", ["margin", "bce"])
@pytest.mark.parametrize("with_outliers", [True, False])
def test_against_naive_per_pixel_loop(form, with_outliers):
    class_logits, mask_logits, labels = _random_case(11, with_outliers)
    ours = mask_contrastive_loss(class_logits, mask_logits, labels, margin=0.7, form=form)
    assert ours.item() == pytest.approx(naive_loss(class_logits, mask_logits, labels, 0.7, form), rel=1e-5)


@pytest.mark.parametrize("case", ["main", "no_outlier", "odd"])
def test_matches_official_loss_ood(case):
    data = np.load(FIXTURES / "loss_ood.npz")
    logits = torch.from_numpy(data[f"{case}_pred_logits"])
    masks = torch.from_numpy(data[f"{case}_pred_masks"])
    ternary = torch.from_numpy(data[f"{case}_ood_mask"].astype(np.int64))
    mapper_bool = torch.from_numpy(data[f"{case}_sem_seg_gt"] == 254).long()
    assert mask_contrastive_loss(logits, masks, ternary).item() == pytest.approx(float(data[f"{case}_loss"]), abs=1e-5)
    assert mask_contrastive_loss(logits, masks, mapper_bool).item() == pytest.approx(
        float(data[f"{case}_loss_mapper_bool"]), abs=1e-5
    )


@pytest.mark.parametrize("sizes", [[(7, 11), (7, 11)], [(9, 13), (5, 8)]], ids=["same", "mixed"])
def test_unpadded_label_sizes_against_naive_loop(sizes):
    """The official alignment: the whole score grid resized onto each image's un-padded labels (top-left)."""
    class_logits, mask_logits, labels = _random_case(15)
    labels[1, 1:4, 2:6] = 1
    ours = mask_contrastive_loss(class_logits, mask_logits, labels, label_sizes=sizes)
    assert ours.item() == pytest.approx(naive_loss(class_logits, mask_logits, labels, label_sizes=sizes), rel=1e-5)
    cropped = mask_contrastive_loss(class_logits, mask_logits, labels[:, :7, :11].contiguous()) if sizes[0] == sizes[1] else None
    if cropped is not None:  # equal sizes: the same as passing the cropped labels
        assert ours.item() == cropped.item()


def test_label_sizes_outside_the_grid_are_named():
    class_logits, mask_logits, labels = _random_case(16)
    with pytest.raises(ValueError, match="label_sizes must give one"):
        mask_contrastive_loss(class_logits, mask_logits, labels, label_sizes=[(9, 14), (9, 13)])
    with pytest.raises(ValueError, match="label_sizes must give one"):
        mask_contrastive_loss(class_logits, mask_logits, labels, label_sizes=[(9, 13)])


def test_gradients_reach_class_and_mask_logits():
    class_logits, mask_logits, labels = _random_case(12)
    class_logits.requires_grad_(True)
    mask_logits.requires_grad_(True)
    mask_contrastive_loss(class_logits, mask_logits, labels).backward()
    assert class_logits.grad.abs().sum() > 0 and mask_logits.grad.abs().sum() > 0


@pytest.mark.parametrize("label", [0, 1])
def test_official_sign_quirk_lowers_max_score_on_inliers_and_outliers(label):
    """Documented behaviour of the official form: descending the loss lowers every mask logit (so max_c S_c)
    on inlier and on outlier pixels alike, more strongly on outliers."""
    class_logits, mask_logits, labels = _random_case(13, shape=(1, 4, 6, 6, 6, 6))
    labels[:] = label
    mask_logits.requires_grad_(True)
    mask_contrastive_loss(class_logits, mask_logits, labels).backward()
    assert (mask_logits.grad >= 0).all() and mask_logits.grad.sum() > 0


def test_bad_input_is_named():
    class_logits, mask_logits, labels = _random_case(14)
    with pytest.raises(ValueError, match="outlier_labels must have shape"):
        mask_contrastive_loss(class_logits, mask_logits, labels[0])
    with pytest.raises(ValueError, match="'hinge'"):
        mask_contrastive_loss(class_logits, mask_logits, labels, form="hinge")
