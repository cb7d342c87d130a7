"""The registry of per-pixel anomaly scorers: adding a scorer is one `Scorer` entry in `SCORERS` (plus its test).

Each scorer turns the channels that the image processor renders for a block of output rows into anomaly scores
(higher = more anomalous). Channels, for C known classes and queries q (softmax over all C+1 class columns):

- ``class_scores`` S (C, n, W): ``S_c(x) = sum_q softmax(class_q)[c] * sigmoid(m_q(x))`` (always rendered);
- ``eam_sum`` (n, W): ``sum_q sigmoid(m_q(x)) * max_c softmax(class_q)[c]`` (rendered when `needs_eam`);
- ``class_logits`` L (C, n, W): ``L_c(x) = sum_q softmax(class_q)[c] * m_q(x)`` over the upsampled mask *logits*
  (rendered when `needs_logits`).

`bounded` scorers live on a fixed `score_range` (up to the odd value just outside it, e.g. 1 - max_c S_c < 0);
unbounded ones (rba <= 0, max_logit and energy, whose logits reach +-15 and more) declare a fixed `display`
range around their threshold instead. Either is the scorer's `display_range`, the colour scale of every heatmap
(values outside are drawn in the end colours), so that a colour means the same score in every image and a
normal image does not look anomalous. `default_threshold` is the scorer's decision threshold when none is set,
each the same rule in the scorer's units: a pixel is anomalous when no class claims it, i.e. max_c S_c < 0.5
(mask2anomaly, eam, msp: score > 0.5; rba: sum_c tanh(S_c) < 0.5, score > -0.5) or no class's mask logit is
positive (max_logit: score > 0; energy: score > -3, about -log 19, the energy of 19 classes with logits 0).
`refined_score` is what refinement writes where a confident "stuff" mask covers a pixel: the "explained" end of
the scale (0 for the bounded scorers, as officially; rba's and the logit scorers' display minimum, since 0 would be
their most anomalous value or the middle of their scale).

This file travels to the Hub as remote code: it imports only the standard library and torch. The scorers use
tensor methods only, so that the registry's names load without torch (the command lines' ``--help`` lists them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ScoreFunction = Callable[["torch.Tensor", "torch.Tensor | None", "torch.Tensor | None"], "torch.Tensor"]


@dataclass(frozen=True)
class Scorer:
    """One anomaly scorer: `function(class_scores (C, n, W), eam_sum (n, W) | None, class_logits (C, n, W) | None)
    -> (n, W)`, the extra channels it needs, and how its values are read."""

    name: str
    function: ScoreFunction
    formula: str
    needs_eam: bool = False
    needs_logits: bool = False
    score_range: tuple[float, float] | None = None  # None: unbounded
    default_threshold: float = 0.5
    display: tuple[float, float] | None = None  # colour scale of an unbounded scorer
    refined_score: float = 0.0

    def __post_init__(self) -> None:
        if self.score_range is None and self.display is None:
            raise ValueError(f"scorer {self.name!r} is unbounded: give it a display range")
        low, high = self.display_range
        if not low <= self.refined_score <= self.default_threshold < high:
            raise ValueError(f"scorer {self.name!r}: expected display low {low} <= refined_score "
                             f"{self.refined_score} <= default_threshold {self.default_threshold} < high {high}")

    @property
    def bounded(self) -> bool:
        return self.score_range is not None

    @property
    def display_range(self) -> tuple[float, float]:
        """Fixed (vmin, vmax) of heatmaps, so that colours mean the same in every image: the score range of a
        bounded scorer, the declared `display` range of an unbounded one."""
        low, high = self.score_range or self.display
        return float(low), float(high)

    @property
    def scale(self) -> str:
        """How summaries name the scale, e.g. ``"rba score, colour scale -1 .. 0"``."""
        low, high = self.display_range
        return f"{self.name} score, colour scale {low:g} .. {high:g}"


def _mask2anomaly(class_scores: torch.Tensor, eam_sum: torch.Tensor | None,
                  class_logits: torch.Tensor | None) -> torch.Tensor:
    return class_scores.max(dim=0).values.neg_().add_(1.0)


def _rba(class_scores: torch.Tensor, eam_sum: torch.Tensor | None, class_logits: torch.Tensor | None) -> torch.Tensor:
    return class_scores.tanh().sum(dim=0).neg_()


def _eam(class_scores: torch.Tensor, eam_sum: torch.Tensor | None, class_logits: torch.Tensor | None) -> torch.Tensor:
    return 1.0 - eam_sum


def _msp(class_scores: torch.Tensor, eam_sum: torch.Tensor | None, class_logits: torch.Tensor | None) -> torch.Tensor:
    # S_c > 0 everywhere (a sum of positive terms), the clamp only guards against underflow
    import torch  # already loaded by whoever made the tensor

    total = class_scores.sum(dim=0).clamp_min(torch.finfo(class_scores.dtype).tiny)
    return 1.0 - class_scores.max(dim=0).values / total


def _max_logit(class_scores: torch.Tensor, eam_sum: torch.Tensor | None,
               class_logits: torch.Tensor | None) -> torch.Tensor:
    return -class_logits.max(dim=0).values


def _energy(class_scores: torch.Tensor, eam_sum: torch.Tensor | None,
            class_logits: torch.Tensor | None) -> torch.Tensor:
    return class_logits.logsumexp(dim=0).neg_()


SCORERS: dict[str, Scorer] = {
    scorer.name: scorer
    for scorer in (
        Scorer("mask2anomaly", _mask2anomaly, "1 - max_c S_c(x) (the paper's and the official code's score)",
               score_range=(0.0, 1.0)),
        Scorer("rba", _rba, "-sum_c tanh(S_c(x)) (Rejected by All, Nayal et al. 2023)", default_threshold=-0.5,
               display=(-1.0, 0.0), refined_score=-1.0),
        Scorer("eam", _eam, "1 - sum_q sigmoid(m_q(x)) * max_c softmax(class_q)[c]", needs_eam=True,
               score_range=(0.0, 1.0)),
        Scorer("msp", _msp, "1 - max_c S_c(x) / sum_c S_c(x)", score_range=(0.0, 1.0)),
        Scorer("max_logit", _max_logit, "-max_c L_c(x)", needs_logits=True, default_threshold=0.0,
               display=(-10.0, 10.0), refined_score=-10.0),
        Scorer("energy", _energy, "-logsumexp_c L_c(x) (free energy at temperature 1)", needs_logits=True,
               default_threshold=-3.0, display=(-10.0, 10.0), refined_score=-10.0),
    )
}

ANOMALY_SCORERS: tuple[str, ...] = tuple(SCORERS)
DEFAULT_SCORER = "mask2anomaly"


def get_scorer(name: str, what: str = "anomaly_scorer") -> Scorer:
    """The registered scorer `name`; ValueError naming the value and the choices otherwise."""
    scorer = SCORERS.get(name) if isinstance(name, str) else None
    if scorer is None:
        raise ValueError(f"{what}={name!r} is not one of {', '.join(ANOMALY_SCORERS)}")
    return scorer


__all__ = ["ANOMALY_SCORERS", "DEFAULT_SCORER", "SCORERS", "Scorer", "get_scorer"]
