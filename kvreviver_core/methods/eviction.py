"""The one storage layer behind every method that physically drops tokens (StreamingLLM, H2O, SnapKV, CaM, VECTOR).

A method is an :class:`EvictionLayer` plus a :class:`Scorer`. The scorer says which held tokens matter most
(:meth:`Scorer.priority`); the layer keeps each sequence's ``capacity`` highest-priority tokens and drops the
rest. Subclasses change what happens to a token on its way out with :meth:`EvictionLayer.before_drop` (CaM merges
its value into the kept tokens; VECTOR may keep its key).

Storage of one layer (B = batch, H = KV heads, S = slots held, D = head_dim):

* ``keys``/``values`` ``(B, H, S, D)``: the kept tokens, in position order along S;
* ``positions`` ``(B, H, S)`` int32: the logical position of each slot (the index in the padded input, which
  RoPE used), or -1 for an empty slot;
* ``state[name]`` ``(B, H, S)`` fp32: the scorer's per-slot numbers (e.g. a cumulative attention score).

Heads choose different tokens, but every head of a sequence keeps the same number, so the slots of a sequence are
filled at the same indices in every head.

Alignment invariants (what the masks rely on):

* Kept tokens are right-aligned: a sequence holding ``c`` tokens fills slots ``S-c .. S-1``, in position order.
  transformers looks its padding mask up at ``slot + (logical_len - S)`` (``get_mask_sizes``); right alignment
  puts every kept token on a non-padding column, so HF never masks a real kept token.
* Empty slots (left of a sequence's tokens, when the batch's sequences hold different counts, or the pads before
  the first compaction) are masked by :meth:`EvictionLayer.slot_mask`.
* transformers builds one mask for all layers from layer 0's sizes, so S must be the same in every layer. It is:
  the capacity depends only on the prompt length and the per-slot bytes, which all layers share, and eviction
  brings every layer to ``min(held, capacity)`` tokens after each attention call.
* Pads are never kept: they leave the store at the first compaction and never count as tokens (e.g. sinks).

Budget: ``capacity`` is :func:`~kvreviver_core.budget.token_capacity` of each sequence's prompt length, charging
:meth:`EvictionLayer.slot_meta_bytes` (positions, scorer state and anything a subclass adds) per slot, so that
:meth:`memory_bytes` stays within the budget. An unlimited budget (1.0) keeps every token and never asks for
scores: the output is the full cache's.

Eviction happens in :meth:`observe`, right after the attention call that used the tokens: a decode step attends
the ``capacity`` kept tokens plus the new one, then the least important is dropped.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvreviver_core.budget import Budget, token_capacity
from kvreviver_core.methods.base import CompressedLayer, tensor_bytes

POSITION_BYTES = 4  # int32 per slot and KV head
STATE_BYTES = 4  # fp32 per slot, KV head and scorer state tensor
# Priorities above this are "protected" tokens (sinks, recent window); scores stay far below it. Priorities are
# float64, so PROTECTED + a position is still exact and ranks protected tokens among themselves.
PROTECTED = 1e12


class Scorer:
    """How an eviction method ranks its tokens. Each layer gets its own scorer instance.

    Per-slot numbers live in ``layer.state``: subclasses name them in ``state_names`` (fp32 tensors the layer
    allocates, moves with their tokens and charges to the budget), and override the three hooks. At an unlimited
    budget no scores are asked for and no state is allocated.
    """

    state_names: ClassVar[tuple[str, ...]] = ()

    def score_queries(self, layer: "EvictionLayer", query_length: int) -> int | None:
        """Attention scores wanted for this call: 0 none, None over all queries, w over the last w queries."""
        return 0

    def observe(self, layer: "EvictionLayer", scores: torch.Tensor | None) -> None:
        """Fold this call's scores ``(B, H, S)`` fp32 (aligned with the slots, new tokens included) into the state."""

    def priority(self, layer: "EvictionLayer") -> torch.Tensor:
        """``(B, H, S)`` float64: higher is kept first. Values on empty slots are ignored."""
        raise NotImplementedError


def protect(priority: torch.Tensor, protected: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Lift ``protected`` slots above every score, ordered among themselves by ``rank`` (higher kept first).

    Args:
        priority: ``(B, H, S)`` float64 scores.
        protected: ``(B, H, S)`` bool.
        rank: ``(B, H, S)`` numbers below ``PROTECTED`` (e.g. positions, so the newest protected token wins).
    """
    return torch.where(protected, PROTECTED + rank.to(torch.float64), priority)


class EvictionLayer(CompressedLayer):
    """Keeps each sequence's ``capacity`` highest-priority tokens exactly; drops the others for good."""

    def __init__(self, layer_idx: int, budget: Budget, scorer: Scorer) -> None:
        super().__init__(layer_idx, budget)
        self.scorer = scorer
        self.capacity: torch.Tensor | None = None  # (B,) long, -1 = unlimited; set at the first observe

    # -- storage ---------------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.positions = torch.empty(self.batch, self.heads, 0, dtype=torch.int32, device=self.device)
        names = () if self.budget.is_unlimited else self.scorer.state_names
        self.state = {name: self.new_state(0) for name in names}

    def new_state(self, slots: int) -> torch.Tensor:
        return torch.zeros(self.batch, self.heads, slots, dtype=torch.float32, device=self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new tokens ``(B, H, T, D)``; returns every held slot's K/V ``(B, H, S + T, D)``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        new_pos = torch.arange(self.logical_len, self.logical_len + t, device=self.device, dtype=torch.int32)
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.positions = torch.cat([self.positions, new_pos.expand(self.batch, self.heads, t)], dim=2)
        self.state = {name: torch.cat([s, self.new_state(t)], dim=2) for name, s in self.state.items()}
        self.logical_len += t
        return self.keys, self.values

    def physical_length(self) -> int:
        return self.keys.shape[2] if self.is_initialized else 0

    # -- views used by scorers and subclasses ----------------------------------------------------------------------
    def filled(self) -> torch.Tensor:
        """``(B, H, S)`` bool: slots that hold a token."""
        return self.positions >= 0

    def held(self) -> torch.Tensor:
        """``(B,)`` long: tokens each sequence holds (the same in every head)."""
        return self.filled()[:, 0].sum(dim=-1)

    def real_positions(self) -> torch.Tensor:
        """``(B, H, S)`` long: index of each slot's token among its sequence's real tokens (pads excluded).

        It is the position the sequence would have alone, unpadded; negative on empty slots.
        """
        return torch.where(self.filled(), self.positions.long() - self.offsets.view(-1, 1, 1), -1)

    def newest(self, count: torch.Tensor) -> torch.Tensor:
        """``(B, H, S)`` bool: slots holding one of the ``count[b]`` most recent tokens of sequence b."""
        return self.positions.long() >= (self.logical_len - count).view(-1, 1, 1)

    # -- attention hooks -------------------------------------------------------------------------------------------
    def slot_mask(self) -> torch.Tensor | None:
        if not self.is_initialized:
            return None
        filled = self.filled()[:, 0]
        return None if bool(filled.all()) else filled

    def score_queries(self, query_length: int) -> int | None:
        if self.budget.is_unlimited:
            return 0
        return self.scorer.score_queries(self, query_length)

    def observe(self, scores: torch.Tensor | None, key_valid: torch.Tensor) -> None:
        first = self.offsets is None
        super().observe(scores, key_valid)
        if first:
            self.positions = self.positions.masked_fill(self.positions.long() < self.offsets.view(-1, 1, 1), -1)
            self.capacity = torch.tensor(
                [self.capacity_for(int(n)) for n in self.prompt_lengths.tolist()], dtype=torch.long, device=self.device
            )
        self.scorer.observe(self, scores)
        if self.budget.is_unlimited:
            return
        held = self.held()
        if first or bool(((self.capacity >= 0) & (held > self.capacity)).any()):
            keep = self.select(torch.where(self.capacity >= 0, torch.minimum(held, self.capacity), held))
            self.before_drop(keep)
            self.compact(keep)

    # -- eviction --------------------------------------------------------------------------------------------------
    def capacity_for(self, prompt_tokens: int) -> int:
        """Slots one sequence may hold, after charging the per-slot metadata (-1 = unlimited)."""
        return token_capacity(self.budget, prompt_tokens, self.token_bytes(), 0, self.slot_meta_bytes())

    def slot_meta_bytes(self) -> int:
        """Bytes held per slot besides its K/V, over all KV heads. Subclasses that keep more add theirs."""
        return self.heads * (POSITION_BYTES + STATE_BYTES * len(self.scorer.state_names))

    def select(self, keep_counts: torch.Tensor) -> torch.Tensor:
        """``(B, H, S)`` bool: each head's ``keep_counts[b]`` highest-priority filled slots."""
        priority = torch.where(self.filled(), self.scorer.priority(self), float("-inf"))
        k = int(keep_counts.max()) if keep_counts.numel() else 0
        keep = torch.zeros_like(priority, dtype=torch.bool)
        if k == 0:
            return keep
        _, top = torch.topk(priority, k, dim=-1)
        within = torch.arange(k, device=self.device).view(1, 1, -1) < keep_counts.view(-1, 1, 1)
        return keep.scatter(2, top, within.expand_as(top))

    def before_drop(self, keep: torch.Tensor) -> None:
        """Called with the ``(B, H, S)`` bool of slots that stay, before the others are dropped. Default: nothing."""

    def compact(self, keep: torch.Tensor) -> None:
        """Keep only the ``keep`` slots, right-aligned in position order; free every column no sequence needs."""
        order_key = torch.where(keep, self.positions, -1)
        slots = int(keep[:, 0].sum(dim=-1).max()) if keep.numel() else 0
        order = torch.argsort(order_key, dim=-1, stable=True)[:, :, order_key.shape[-1] - slots :]
        gather = order.unsqueeze(-1).expand(-1, -1, -1, self.head_dim)
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, gather)
        self.positions = torch.where(keep.gather(2, order), self.positions.gather(2, order), -1)
        self.state = {name: s.gather(2, order) for name, s in self.state.items()}

    # -- accounting ------------------------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return tensor_bytes(self.keys, self.values, self.positions, *self.state.values())

    def kept_positions(self) -> list[list[set[int]]]:
        """Per sequence and KV head, the set of logical positions held (for reports and tests)."""
        return [[set(p[p >= 0].tolist()) for p in row] for row in self.positions]
