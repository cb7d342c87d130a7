"""The scorer registry: every registered scorer against a naive float64 formula written here (method.md and the
processor's docstring), the registry as the one source of names, channels and display ranges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling_mask2anomaly import ANOMALY_SCORERS, SCORERS
from modeling_mask2anomaly.visualize import BOUNDED_SCORERS, default_score_range

NUM_QUERIES, NUM_CLASSES, ROWS, COLS = 7, 5, 4, 6


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _queries(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class logits (Q, C+1) and mask logits (Q, n, W) in float64."""
    gen = np.random.default_rng(seed)
    return gen.normal(0, 3, (NUM_QUERIES, NUM_CLASSES + 1)), gen.normal(0, 4, (NUM_QUERIES, ROWS, COLS))


# Naive per-pixel formulas from the queries, one pixel at a time (method.md: S_c(x) = sum_q p_q[c] sigmoid(m_q(x))
# with p the softmax over all C+1 columns, restricted to the C known classes; L_c the same sum over the logits).
def _pixel_terms(class_logits: np.ndarray, mask_logits: np.ndarray, y: int, x: int):
    p = _softmax(class_logits, axis=1)[:, :NUM_CLASSES]
    m = mask_logits[:, y, x]
    sig = 1.0 / (1.0 + np.exp(-m))
    s = np.array([sum(p[q, c] * sig[q] for q in range(NUM_QUERIES)) for c in range(NUM_CLASSES)])
    logits = np.array([sum(p[q, c] * m[q] for q in range(NUM_QUERIES)) for c in range(NUM_CLASSES)])
    return p, sig, s, logits


NAIVE = {
    "mask2anomaly": lambda p, sig, s, l: 1.0 - max(s),
    "rba": lambda p, sig, s, l: -sum(np.tanh(v) for v in s),
    "eam": lambda p, sig, s, l: 1.0 - sum(sig[q] * max(p[q]) for q in range(NUM_QUERIES)),
    "msp": lambda p, sig, s, l: 1.0 - max(s) / sum(s),
    "max_logit": lambda p, sig, s, l: -max(l),
    "energy": lambda p, sig, s, l: -np.log(sum(np.exp(v) for v in l)),
}


def test_every_registered_scorer_has_a_naive_formula():
    assert set(NAIVE) == set(SCORERS), "a new scorer needs its naive formula in NAIVE"
    assert ANOMALY_SCORERS == tuple(SCORERS)


def _channels(class_logits: np.ndarray, mask_logits: np.ndarray):
    """The channels the processor renders (scorers.py docstring), as float32 torch tensors."""
    p = torch.from_numpy(_softmax(class_logits, axis=1)[:, :NUM_CLASSES]).float()  # (Q, C)
    m = torch.from_numpy(mask_logits).float()  # (Q, n, W)
    sig = m.sigmoid()
    class_scores = torch.einsum("qc,qhw->chw", p, sig)
    eam_sum = torch.einsum("q,qhw->hw", p.max(dim=1).values, sig)
    class_logits_channels = torch.einsum("qc,qhw->chw", p, m)
    return class_scores, eam_sum, class_logits_channels


@pytest.mark.parametrize("name", list(SCORERS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scorer_matches_naive_formula(name, seed):
    scorer = SCORERS[name]
    class_logits, mask_logits = _queries(seed)
    class_scores, eam_sum, logits = _channels(class_logits, mask_logits)
    # a scorer gets only the channels it declares it needs
    result = scorer.function(class_scores.clone(), eam_sum if scorer.needs_eam else None,
                             logits if scorer.needs_logits else None)
    assert result.shape == (ROWS, COLS) and result.dtype == torch.float32
    expected = np.array([[NAIVE[name](*_pixel_terms(class_logits, mask_logits, y, x)) for x in range(COLS)]
                         for y in range(ROWS)])
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-5)
    if scorer.bounded:
        # S_c >= 0, so no bounded score exceeds its range; below it only 1 - (a sum over queries) can go, since
        # S_c is not a probability (with these random queries it does)
        assert (result.numpy() <= scorer.score_range[1] + 1e-6).all()


def test_scorer_does_not_modify_shared_channels():
    class_scores, eam_sum, logits = _channels(*_queries(3))
    before = class_scores.clone()
    for scorer in SCORERS.values():
        scorer.function(class_scores, eam_sum, logits)
    assert torch.equal(class_scores, before), "the class channels are reused for the semantic map"


def test_display_ranges_come_from_the_registry():
    assert set(BOUNDED_SCORERS) == {"mask2anomaly", "eam", "msp"}
    wide = np.array([[-3.0, 7.0]], dtype=np.float32)
    # every scorer has a fixed colour scale, the same whatever the image holds
    expected = {"mask2anomaly": (0.0, 1.0), "eam": (0.0, 1.0), "msp": (0.0, 1.0), "rba": (-1.0, 0.0),
                "max_logit": (-10.0, 10.0), "energy": (-10.0, 10.0)}
    for name in SCORERS:
        assert default_score_range(wide, name) == pytest.approx(expected[name]), name
        assert default_score_range(wide * 100, name) == pytest.approx(expected[name]), name
    with pytest.raises(ValueError, match="scorer='oracle' is not one of mask2anomaly"):
        default_score_range(wide, "oracle")


# The decision rule written once, in each scorer's units: a pixel is anomalous when no class claims it
# (max_c S_c < 0.5, i.e. sum_c tanh(S_c) < 0.5 for rba with one class present) or no class's mask logit is positive.
# (energy: about -log 19, all 19 Cityscapes classes at logit 0)
THRESHOLDS = {"mask2anomaly": 0.5, "eam": 0.5, "msp": 0.5, "rba": -0.5, "max_logit": 0.0, "energy": -3.0}


def test_default_thresholds_and_refined_scores_sit_inside_each_scale():
    for name, scorer in SCORERS.items():
        low, high = scorer.display_range
        assert scorer.default_threshold == THRESHOLDS[name], name
        assert low <= scorer.refined_score <= scorer.default_threshold < high, name
        assert scorer.scale == f"{name} score, colour scale {low:g} .. {high:g}"


def test_default_thresholds_separate_a_claimed_pixel_from_an_unclaimed_one():
    """One confident query of class 0 over the left column, nothing anywhere else: under every scorer's default
    threshold the claimed pixels are normal and the unclaimed ones anomalous (msp, a ratio between the classes,
    measures ambiguity, not absence: it is left out)."""
    class_logits = np.full((NUM_QUERIES, NUM_CLASSES + 1), -8.0)
    class_logits[:, -1] = 8.0  # the other queries say "no object"
    class_logits[0, 0], class_logits[0, -1] = 8.0, -8.0
    mask_logits = np.full((NUM_QUERIES, ROWS, COLS), -6.0)
    mask_logits[0, :, 0] = 6.0
    channels = _channels(class_logits, mask_logits)
    for name, scorer in SCORERS.items():
        if name == "msp":
            continue
        result = scorer.function(channels[0].clone(), channels[1] if scorer.needs_eam else None,
                                 channels[2] if scorer.needs_logits else None).numpy()
        above = result > scorer.default_threshold
        assert not above[:, 0].any() and above[:, 1:].all(), (name, result[0])


def test_a_scorer_without_a_scale_or_with_a_threshold_outside_it_is_refused():
    from modeling_mask2anomaly.scorers import Scorer

    with pytest.raises(ValueError, match="'free' is unbounded: give it a display range"):
        Scorer("free", SCORERS["rba"].function, "x")
    with pytest.raises(ValueError, match="default_threshold 0.5 < high 0.0"):
        Scorer("bad", SCORERS["rba"].function, "x", display=(-1.0, 0.0), refined_score=-1.0)
