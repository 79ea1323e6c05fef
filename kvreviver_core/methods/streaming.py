"""``streaming``: StreamingLLM (Xiao et al., 2024). Attention sinks plus a window of the most recent tokens.

Each sequence keeps its first ``sinks`` *real* tokens (pads never count) and fills the rest of its capacity with
its newest tokens. No attention scores are needed, so attention runs on the plain SDPA path. Positions stay the
logical ones (RoPE was applied before caching); the original paper re-assigns positions inside the cache, which
this cache does not do, like most later reimplementations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvreviver_core.budget import Budget
from kvreviver_core.methods.base import CompressedLayer, Method, register
from kvreviver_core.methods.eviction import PROTECTED, EvictionLayer, Scorer, protect


class StreamingScorer(Scorer):
    """Sinks first (earliest highest), then recency."""

    def __init__(self, sinks: int) -> None:
        self.sinks = sinks

    def priority(self, layer: EvictionLayer) -> torch.Tensor:
        real = layer.real_positions()
        recency = real.to(torch.float64)
        # Sinks rank above every recent token, and the first sink above the last one.
        return protect(recency, real < self.sinks, PROTECTED - real)


@register("streaming")
@dataclass
class StreamingMethod(Method):
    """StreamingLLM.

    Args:
        sinks: number of initial tokens kept for good (the attention sinks), 4 in the paper.
    """

    sinks: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be a non-negative integer, got {self.sinks!r}")

    def make_layer(self, layer_idx: int, budget: Budget) -> CompressedLayer:
        return EvictionLayer(layer_idx, budget, StreamingScorer(self.sinks))
