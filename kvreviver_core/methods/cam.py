"""``cam``: CaM, Cache Merging (Zhang et al., ICML 2024), on H2O's choice of tokens.

Which tokens leave is H2O's decision (:class:`~kvreviver_core.methods.h2o.H2OScorer`: cumulative attention plus
a recent window). CaM changes what happens to a token on its way out: its *value* is merged into the kept tokens
that follow it; its key is dropped, as in the paper.

For a dropped token i of a KV head (the paper's Algorithm 1 and Eq. 14):

* merge targets: the ``m`` kept tokens that follow i in position order (``m = merge_span``; by default the size of
  the recent window, as the paper's merge budget equals its recent budget; fewer if fewer follow);
* merge probability ``p = clamp(A_i / mean(A_targets), 0, 1)``, where ``A`` is a token's average attention, its
  cumulative score divided by the number of queries that have seen it (``logical_len - position``);
* a Bernoulli draw ``M ~ Bernoulli(p)``; if ``M = 1``, every target's value gains ``V_i / m``.

Tokens dropped in the same call merge into tokens that stay, so one call never merges into a token it drops;
across calls, a token that received merges carries them along if it is dropped later (the paper's cascade).

The Bernoulli draws come from a hash of (seed, layer, KV head, position of the token among its sequence's real
tokens), so a sequence gets the same draws alone or left-padded in a batch, and a run is reproducible. CaM keeps
nothing beyond H2O's scores and positions, so it costs the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvreviver_core.budget import Budget
from kvreviver_core.methods.base import CompressedLayer, Method, register
from kvreviver_core.methods.eviction import EvictionLayer
from kvreviver_core.methods.h2o import H2OScorer, check_share
from kvreviver_core.ops import accumulation_dtype, add_at
from kvreviver_core.sketch import _mix


class CaMLayer(EvictionLayer):
    """H2O eviction whose dropped values are merged into the following kept tokens."""

    def __init__(self, layer_idx: int, budget: Budget, recent_share: float, merge_span: int, seed: int) -> None:
        super().__init__(layer_idx, budget, H2OScorer(recent_share))
        self.merge_span = merge_span
        self.seed = seed

    def spans(self) -> torch.Tensor:
        """``(B,)`` long: m, the number of kept tokens each dropped value is spread over."""
        if self.merge_span > 0:
            return torch.full((self.batch,), self.merge_span, dtype=torch.long, device=self.device)
        return self.scorer.recent_counts(self).clamp(min=1)

    def average_attention(self) -> torch.Tensor:
        """``(B, H, S)`` fp32: cumulative score over the number of queries that have seen each token (0 if empty)."""
        seen = (self.logical_len - self.positions.long()).clamp(min=1)
        return torch.where(self.filled(), self.state["score"] / seen, 0.0)

    def uniforms(self) -> torch.Tensor:
        """``(B, H, S)`` float64 in [0, 1): the Bernoulli draws, a hash of (seed, layer, head, real position)."""
        head = torch.arange(self.heads, device=self.device).view(1, -1, 1)
        x = self.real_positions() * 0x9E3779B1 + head * 0x632BE5AB + self.layer_idx * 0x27D4EB2F + self.seed * 0x165667B1 + 1
        return (_mix(x) >> 10).double() / float(1 << 53)  # _mix leaves the sign bit clear: 53 random bits remain

    def before_drop(self, keep: torch.Tensor) -> None:
        dropped = self.filled() & ~keep
        if not bool(dropped.any()):
            return
        s = self.positions.shape[-1]
        positions = self.positions.long()
        # Kept slots sorted by position land at the end; a dropped token's targets are sorted[start : stop].
        sorted_pos, order = torch.where(keep, positions, -1).sort(dim=-1, stable=True)
        start = torch.searchsorted(sorted_pos, positions.contiguous(), right=True)
        stop = torch.minimum(start + self.spans().view(-1, 1, 1), torch.tensor(s, device=self.device))
        count = (stop - start).clamp(min=0)

        attention = self.average_attention().double()
        sorted_attention = torch.where(sorted_pos >= 0, attention.gather(2, order), 0.0)
        prefix = F.pad(sorted_attention.cumsum(dim=-1), (1, 0))
        target_mean = (prefix.gather(2, stop) - prefix.gather(2, start)) / count.clamp(min=1)
        probability = torch.where(target_mean > 0, (attention / target_mean).clamp(0, 1), (attention > 0).double())
        merged = dropped & (count > 0) & (self.uniforms() < probability)
        if not bool(merged.any()):
            return

        # Spread V_i / m over sorted slots [start, stop) with a difference array, then undo the sort.
        work = accumulation_dtype(self.values.dtype)
        weight = merged.to(work) / count.clamp(min=1)
        share = self.values.to(work) * weight.unsqueeze(-1)
        d = self.head_dim
        delta = torch.zeros(self.batch, self.heads, s + 1, d, dtype=work, device=self.device)
        add_at(delta, start, share)
        add_at(delta, stop, -share)
        added_sorted = delta.cumsum(dim=2)[:, :, :s]
        added = torch.zeros_like(added_sorted).scatter_(2, order.unsqueeze(-1).expand(-1, -1, -1, d), added_sorted)
        self.values = torch.where(keep.unsqueeze(-1), (self.values.to(work) + added).to(self.values.dtype), self.values)


@register("cam")
@dataclass
class CaMMethod(Method):
    """CaM.

    Args:
        recent_share: H2O's recent window, as a share of each sequence's capacity (0.5).
        merge_span: m, the kept tokens each dropped value is spread over; 0 means the recent window's size.
        seed: seed of the Bernoulli merge draws.
    """

    recent_share: float = 0.5
    merge_span: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check_share("recent_share", self.recent_share)
        if isinstance(self.merge_span, bool) or not isinstance(self.merge_span, int) or self.merge_span < 0:
            raise ValueError(f"merge_span must be a non-negative integer (0 = the recent window), got {self.merge_span!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def make_layer(self, layer_idx: int, budget: Budget) -> CompressedLayer:
        return CaMLayer(layer_idx, budget, float(self.recent_share), self.merge_span, self.seed)
