"""``h2o``: H2O (Zhang et al., NeurIPS 2023). Heavy hitters by cumulative attention, plus a recent window.

Every attention call (prefill and each decode step) adds, for each held token and KV head, the softmax
probability it received, summed over the queries and over the query heads of the KV group. A sequence keeps its
``recent_share x capacity`` newest tokens and fills the rest of its capacity with the highest cumulative scores
among the older ones. Eviction runs after every attention call, so it continues during decode: each new token
pushes out the lowest-scored non-recent token. Dropped tokens take their score with them.

The score is charged to the budget (fp32 per slot and KV head), with the position of each slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvreviver_core.budget import Budget
from kvreviver_core.methods.base import CompressedLayer, Method, register
from kvreviver_core.methods.eviction import EvictionLayer, Scorer, protect


def check_share(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


class H2OScorer(Scorer):
    """Cumulative attention score (state ``"score"``), with the newest ``recent_share`` of capacity protected."""

    state_names = ("score",)

    def __init__(self, recent_share: float) -> None:
        self.recent_share = recent_share

    def score_queries(self, layer: EvictionLayer, query_length: int) -> int | None:
        return None

    def observe(self, layer: EvictionLayer, scores: torch.Tensor | None) -> None:
        if scores is not None:
            layer.state["score"] += scores

    def recent_counts(self, layer: EvictionLayer) -> torch.Tensor:
        """``(B,)`` long: size of each sequence's protected recent window."""
        return torch.round(layer.capacity.clamp(min=0).double() * self.recent_share).long()

    def priority(self, layer: EvictionLayer) -> torch.Tensor:
        return protect(layer.state["score"].double(), layer.newest(self.recent_counts(layer)), layer.positions)


@register("h2o")
@dataclass
class H2OMethod(Method):
    """H2O.

    Args:
        recent_share: share of each sequence's capacity reserved for its newest tokens (the paper's 50/50 split
            of heavy hitters and recent tokens is 0.5).
    """

    recent_share: float = 0.5

    def __post_init__(self) -> None:
        check_share("recent_share", self.recent_share)

    def make_layer(self, layer_idx: int, budget: Budget) -> CompressedLayer:
        return EvictionLayer(layer_idx, budget, H2OScorer(float(self.recent_share)))
