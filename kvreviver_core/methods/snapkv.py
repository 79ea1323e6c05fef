"""``snapkv``: SnapKV (Li et al., 2024). The prompt's last queries vote for the tokens worth keeping.

At prefill, the attention of the observation window (the last ``window`` queries of the prompt), summed over
those queries and over the query heads of each KV group, is max-pooled along the tokens (``kernel``, odd, so a
kept token brings its neighbours) and picks, per KV head, the prefix tokens that fill the capacity besides the
window itself, which is always kept. Pooling only looks at prefix tokens; the window's own columns count as zero.

Decode (the paper does not bound it; we keep the memory constant, as the budget promises): new tokens are
appended and protected like the window. Once a sequence is over its capacity, the prefix token with the lowest
pooled score goes first, so the prefill selection shrinks from its weakest end while the newest context stays.
When no prefix token is left, the oldest window or decode token goes (a sliding window). No scores are computed
after prefill, so decode attention runs on the plain SDPA path. The pooled score is kept per slot (fp32, charged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvreviver_core.budget import Budget
from kvreviver_core.methods.base import CompressedLayer, Method, register
from kvreviver_core.methods.eviction import EvictionLayer, Scorer, protect


class SnapKVScorer(Scorer):
    """Pooled observation-window attention (state ``"pooled"``); window and decode tokens protected."""

    state_names = ("pooled",)

    def __init__(self, window: int, kernel: int) -> None:
        self.window = window
        self.kernel = kernel
        self.window_start: int | None = None  # logical position of the first window token, fixed at prefill

    def score_queries(self, layer: EvictionLayer, query_length: int) -> int | None:
        return self.window if layer.offsets is None else 0

    def observe(self, layer: EvictionLayer, scores: torch.Tensor | None) -> None:
        if self.window_start is not None:
            return
        self.window_start = max(0, layer.logical_len - self.window)
        if scores is None:
            return
        prefix = scores.masked_fill(layer.positions.long() >= self.window_start, 0.0)
        b, h, s = prefix.shape
        pooled = F.max_pool1d(prefix.reshape(b * h, 1, s), self.kernel, stride=1, padding=self.kernel // 2)
        layer.state["pooled"] = pooled.reshape(b, h, s)

    def priority(self, layer: EvictionLayer) -> torch.Tensor:
        recent = layer.positions.long() >= self.window_start
        return protect(layer.state["pooled"].double(), recent, layer.positions)


@register("snapkv")
@dataclass
class SnapKVMethod(Method):
    """SnapKV.

    Args:
        window: observation window, the number of last prompt queries whose attention is scored (32).
        kernel: max-pooling kernel along the tokens, odd (7).
    """

    window: int = 32
    kernel: int = 7

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive integer, got {self.window!r}")
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd integer, got {self.kernel!r}")

    def make_layer(self, layer_idx: int, budget: Budget) -> CompressedLayer:
        return EvictionLayer(layer_idx, budget, SnapKVScorer(self.window, self.kernel))
