"""The model's loss wiring: the contrastive loss's label alignment (pixel_mask), and matching and losses in float32
under autocast (transformers' own matcher changes its assignment under bfloat16 and float16 autocast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

from modeling_mask2anomaly import (
    OUTLIER_LABEL,
    Mask2AnomalyConfig,
    Mask2AnomalyForUniversalSegmentation,
    Mask2AnomalyImageProcessor,
    mask_contrastive_loss,
)
from modeling_mask2anomaly.modeling_mask2anomaly import Mask2AnomalyLoss

pytestmark = pytest.mark.usefixtures("single_thread")

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _tiny_model(**config) -> Mask2AnomalyForUniversalSegmentation:
    torch.manual_seed(0)
    return Mask2AnomalyForUniversalSegmentation(Mask2AnomalyConfig.tiny(train_num_points=256, **config)).train()


def _batch(sizes: list[tuple[int, int]], seed: int = 0):
    """Processor inputs for label maps of the given sizes (classes 0, 1, 2 in bands, an outlier block, void)."""
    rng = np.random.default_rng(seed)
    images, maps = [], []
    for h, w in sizes:
        images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        label = np.zeros((h, w), np.uint8)
        label[: h // 3] = 1
        label[h // 3 : h // 2] = 2
        label[h // 2 :, : w // 4] = 255
        label[h // 2 : h // 2 + 8, w // 2 : w // 2 + 10] = OUTLIER_LABEL
        maps.append(label)
    processor = Mask2AnomalyImageProcessor(do_resize=False)
    return processor(images=images, segmentation_maps=maps, return_tensors="pt")


class RecordOrReplay:
    """`torch.rand` stand-in: records the draws of a first run, then replays them in the same order."""

    def __init__(self):
        self.draws: list[torch.Tensor] = []
        self.replaying, self.index = False, 0
        self.rand = torch.rand

    def __call__(self, *size, **kwargs):
        if not self.replaying:
            self.draws.append(self.rand(*size, **kwargs))
            return self.draws[-1].clone()
        draw = self.draws[self.index]
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        assert tuple(draw.shape) == shape, f"draw {self.index}: {shape} asked, {tuple(draw.shape)} recorded"
        self.index += 1
        return draw.clone()


# ----------------------------------------------------------------------------------------------------------------
# contrastive_loss_alignment
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alignment", ["official", "padded"])
def test_contrastive_alignment_uses_the_unpadded_size_of_each_image(alignment):
    """Two images of different sizes, padded to one grid: "official" resizes onto each image's own size (known
    here from the sizes we made, not from pixel_mask), "padded" onto the full padded grid."""
    sizes = [(40, 72), (56, 90)]
    inputs = _batch(sizes)
    assert tuple(inputs["outlier_labels"].shape[1:]) == (64, 96)
    model = _tiny_model(contrastive_loss_alignment=alignment)
    with torch.no_grad():
        out = model(**inputs, output_auxiliary_logits=True)
    expected_sizes = sizes if alignment == "official" else None
    predictions = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in out.auxiliary_logits]
    predictions.append((out.class_queries_logits, out.masks_queries_logits))
    names = [f"loss_contrastive_{i}" for i in range(len(predictions) - 1)] + ["loss_contrastive"]
    for name, (classes, masks) in zip(names, predictions):
        expected = mask_contrastive_loss(classes, masks, inputs["outlier_labels"], label_sizes=expected_sizes)
        assert torch.equal(out.loss_dict[name], expected), name
    other = mask_contrastive_loss(out.class_queries_logits, out.masks_queries_logits, inputs["outlier_labels"],
                                  label_sizes=None if alignment == "official" else sizes)
    assert abs(other.item() - out.loss_dict["loss_contrastive"].item()) > 1e-6, "the two alignments coincide here"


def test_official_alignment_equals_padded_without_padding_or_pixel_mask():
    inputs = _batch([(64, 96), (64, 96)])
    terms = {}
    for alignment in ("official", "padded"):
        model = _tiny_model(contrastive_loss_alignment=alignment)
        with torch.no_grad():
            terms[alignment] = model(pixel_values=inputs["pixel_values"], outlier_labels=inputs["outlier_labels"],
                                     pixel_mask=inputs["pixel_mask"]).loss_dict
    assert terms["official"].keys() == terms["padded"].keys()
    assert all(torch.equal(terms["official"][k], terms["padded"][k]) for k in terms["official"])

    padded = _batch([(40, 72), (56, 90)])
    model = _tiny_model()
    with torch.no_grad():
        without_mask = model(pixel_values=padded["pixel_values"], outlier_labels=padded["outlier_labels"]).loss_dict
    # no pixel_mask: outlier_labels are taken as they are (un-padded)
    out = model(pixel_values=padded["pixel_values"], output_auxiliary_logits=False)
    expected = mask_contrastive_loss(out.class_queries_logits, out.masks_queries_logits, padded["outlier_labels"])
    assert torch.allclose(without_mask["loss_contrastive"], expected)


def test_bad_pixel_mask_is_named():
    inputs = _batch([(40, 72), (56, 90)])
    model = _tiny_model()
    holes = inputs["pixel_mask"].clone()
    holes[0, 3, 5] = 0
    with pytest.raises(ValueError, match="pixel_mask of image 0 is not a non-empty top-left rectangle"):
        model(pixel_values=inputs["pixel_values"], outlier_labels=inputs["outlier_labels"], pixel_mask=holes)
    with pytest.raises(ValueError, match=r"pixel_mask of shape \(2, 32, 96\) does not match outlier_labels"):
        model(pixel_values=inputs["pixel_values"], outlier_labels=inputs["outlier_labels"],
              pixel_mask=inputs["pixel_mask"][:, :32])


def test_alignment_value_is_checked():
    with pytest.raises(Exception, match="contrastive_loss_alignment='aligned' is not one of official, padded"):
        Mask2AnomalyConfig.tiny(contrastive_loss_alignment="aligned")


# ----------------------------------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------------------------------
def _matching_case(seed: int = 0):
    """Logits of small magnitude, so many costs are close and a low-precision cost reorders them."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.randn(2, 20, 24, 40, generator=g) * 0.3
    classes = torch.randn(2, 20, 20, generator=g) * 0.3
    mask_labels = [(torch.rand(6, 96, 160, generator=g) < 0.3).float() for _ in range(2)]
    class_labels = [torch.randperm(19, generator=g)[:6] for _ in range(2)]
    return masks, classes, mask_labels, class_labels


WEIGHTS = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def _matching(criterion_class, case, dtype=None) -> list:
    """The Hungarian assignments a criterion's forward makes (final prediction only), under autocast `dtype`."""
    criterion = criterion_class(Mask2AnomalyConfig.tiny(num_queries=20, train_num_points=12544), WEIGHTS)
    assignments = []
    criterion.matcher.register_forward_hook(lambda module, inputs, output: assignments.append(output))
    torch.manual_seed(1)  # the same sampled points in every call
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        criterion(*case)
    return assignments[0]


def _same_indices(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_matching_under_autocast_equals_float32(dtype):
    case = _matching_case()
    reference = _matching(Mask2AnomalyLoss, case)
    assert _same_indices(_matching(Mask2AnomalyLoss, case, dtype), reference)
    # the reason for the override: transformers' own criterion assigns differently under the same autocast
    assert _same_indices(_matching(Mask2FormerLoss, case), reference)
    assert not _same_indices(_matching(Mask2FormerLoss, case, dtype), reference)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_criterion_under_autocast_equals_float32(dtype):
    config = Mask2AnomalyConfig.tiny(num_queries=20)
    criterion = Mask2AnomalyLoss(config, WEIGHTS)
    masks, classes, mask_labels, class_labels = _matching_case(2)
    aux = [{"masks_queries_logits": masks * 0.5, "class_queries_logits": classes * 2.0}]
    torch.manual_seed(3)
    reference = criterion(masks, classes, mask_labels, class_labels, aux)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=dtype):
        got = criterion(masks, classes, mask_labels, class_labels, aux)
    assert got.keys() == reference.keys()
    for key in reference:
        assert got[key].dtype == torch.float32 and torch.equal(got[key], reference[key]), key

    outliers = (torch.rand(2, 96, 160, generator=torch.Generator().manual_seed(4)) < 0.1).long()
    reference = mask_contrastive_loss(classes, masks, outliers, label_sizes=[(96, 150), (80, 160)])
    with torch.autocast("cpu", dtype=dtype):
        got = mask_contrastive_loss(classes, masks, outliers, label_sizes=[(96, 150), (80, 160)])
    assert got.dtype == torch.float32 and torch.equal(got, reference)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_model_losses_under_autocast_are_the_float32_losses_of_its_logits(dtype, monkeypatch):
    """A whole training forward under autocast: each loss term equals the float32 loss computed, outside
    autocast and with the same random points, from the (low-precision) logits that forward produced."""
    inputs = _batch([(40, 72), (56, 90)])
    model = _tiny_model()
    rand = RecordOrReplay()
    monkeypatch.setattr(torch, "rand", rand)
    with torch.autocast("cpu", dtype=dtype):
        out = model(**inputs, output_auxiliary_logits=True)
    assert out.masks_queries_logits.dtype == dtype  # the forward did run in low precision
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)

    rand.replaying = True
    aux = [{k: v.detach().float() for k, v in a.items()} for a in out.auxiliary_logits]
    with torch.no_grad():
        expected = model.get_loss_dict(out.masks_queries_logits.detach().float(),
                                       out.class_queries_logits.detach().float(),
                                       inputs["mask_labels"], inputs["class_labels"], aux)
        expected.update(model.contrastive_loss_dict(
            tuple(a["class_queries_logits"] for a in aux) + (out.class_queries_logits.detach().float(),),
            tuple(a["masks_queries_logits"] for a in aux) + (out.masks_queries_logits.detach().float(),),
            inputs["outlier_labels"], inputs["pixel_mask"],
        ))
    assert rand.index == len(rand.draws)
    assert out.loss_dict.keys() == expected.keys()
    for key, value in expected.items():
        assert out.loss_dict[key].dtype == torch.float32 and torch.equal(out.loss_dict[key].detach(), value), key
