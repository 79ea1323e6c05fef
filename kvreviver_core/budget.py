"""Memory budget shared by every method, and KVReviver's Vague/Candidate/Recent split.

What the budget fraction means (so that a user can predict the memory):

* ``Budget(0.1)`` allows each layer, for each sequence, 10% of the bytes that the full cache holds for that
  sequence's **prompt** (its non-padding tokens at prefill). The capacity is fixed at prefill and does not grow
  while decoding: exact parts and sketch stay constant. Per-token metadata (KVReviver's fp32 score, 4 bytes per KV
  head) grows with each generated token, far slower than the full cache, so the share of its memory only shrinks.
* ``Budget(tokens=512)`` allows the memory of 512 exact tokens per layer and sequence, whatever the prompt length.
* Every byte a method keeps counts against the budget: exact keys and values, the sketch, and per-token metadata
  such as cumulative attention scores and stored positions (see :func:`token_capacity`).
* A budget of 1.0 is the full cache's memory: nothing needs compressing, and every method then keeps every token
  exactly. A token budget larger than the context behaves the same until the sequence outgrows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_SPLIT: tuple[float, float, float] = (0.1, 0.45, 0.45)
# The Budget fields a method spec may set beside the method's own options (make_cache, niah's name:key=value).
TUNABLE_FIELDS: tuple[str, ...] = ("split", "sketch_rows", "replace_rate", "recent_slack")


@dataclass(frozen=True)
class Budget:
    """The memory allowed to a compressed cache.

    Args:
        fraction: share of the full cache's memory for the prompt, in (0, 1]. Exclusive with ``tokens``.
        tokens: absolute capacity in exact-token equivalents per layer and sequence. Exclusive with ``fraction``.
        split: (vague, candidate, recent) shares of the capacity, summing to 1 (KVReviver only).
        sketch_rows: r, the number of hash rows of the Vague Count-Sketch.
        replace_rate: a Vague token is swapped back into Candidate while the lowest Candidate score times this
            rate is below its score. Must be >= 1 so that a swap never undoes the previous one.
        recent_slack: how far Recent may grow past its share before its oldest tokens move to Candidate in bulk.
            The slack is taken out of the Recent share, so the memory never exceeds the budget.
    """

    fraction: float | None = None
    tokens: int | None = None
    split: tuple[float, float, float] = field(default=DEFAULT_SPLIT)
    sketch_rows: int = 3
    replace_rate: float = 1.1
    recent_slack: int = 8

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.tokens is None):
            raise ValueError("Budget needs exactly one of fraction= or tokens=")
        if self.fraction is not None:
            if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)):
                raise ValueError(f"budget fraction must be a number, got {self.fraction!r}")
            if not (0.0 < float(self.fraction) <= 1.0) or math.isnan(self.fraction):
                raise ValueError(f"budget fraction must be in (0, 1], got {self.fraction}")
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 1):
            raise ValueError(f"budget tokens must be a positive integer, got {self.tokens!r}")
        split = tuple(float(s) for s in self.split)
        if len(split) != 3:
            raise ValueError(f"split must have 3 parts (vague, candidate, recent), got {len(split)}")
        if any(s < 0 or math.isnan(s) for s in split):
            raise ValueError(f"split parts must be >= 0, got {split}")
        if abs(sum(split) - 1.0) > 1e-6:
            raise ValueError(f"split must sum to 1, got {'+'.join(f'{s:g}' for s in split)} = {sum(split):g}")
        object.__setattr__(self, "split", split)
        if not isinstance(self.sketch_rows, int) or self.sketch_rows < 1:
            raise ValueError(f"sketch rows r must be an integer >= 1, got {self.sketch_rows!r}")
        if isinstance(self.replace_rate, bool) or not isinstance(self.replace_rate, (int, float)):
            raise ValueError(f"replace rate must be a number, got {self.replace_rate!r}")
        if not (self.replace_rate >= 1.0):
            raise ValueError(f"replace rate must be >= 1, got {self.replace_rate}")
        if not isinstance(self.recent_slack, int) or self.recent_slack < 0:
            raise ValueError(f"recent slack must be a non-negative integer, got {self.recent_slack!r}")

    @classmethod
    def coerce(cls, budget: "Budget | float | int", **overrides) -> "Budget":
        """Accept a Budget, a fraction (float) or a token count (int)."""
        if isinstance(budget, Budget):
            return budget if not overrides else cls(**{**budget.__dict__, **overrides})
        if isinstance(budget, bool):
            raise ValueError(f"budget must be a number, got {budget!r}")
        if isinstance(budget, int) and budget > 1:
            return cls(tokens=budget, **overrides)
        if isinstance(budget, (int, float)):
            return cls(fraction=float(budget), **overrides)
        raise ValueError(f"budget must be a Budget, a fraction in (0, 1] or a token count, got {budget!r}")

    @property
    def is_unlimited(self) -> bool:
        return self.fraction is not None and self.fraction >= 1.0

    def describe(self) -> str:
        amount = f"{self.fraction:g}" if self.fraction is not None else f"{self.tokens} tokens"
        return f"{amount} (V/C/R {'/'.join(f'{s:g}' for s in self.split)})"


def token_capacity(
    budget: Budget, prompt_tokens: int, token_bytes: int, per_token_meta_bytes: int = 0, per_slot_meta_bytes: int = 0
) -> int:
    """Exact-token slots that fit in the budget for one sequence of one layer.

    Args:
        prompt_tokens: non-padding tokens of the sequence at prefill.
        token_bytes: bytes of one token's key and value over all KV heads of the layer.
        per_token_meta_bytes: metadata kept for *every* token of the context (e.g. a cumulative score).
        per_slot_meta_bytes: metadata kept for each stored slot (e.g. its position).

    Returns ``-1`` for an unlimited budget (1.0): the method keeps everything exactly.
    """
    if budget.is_unlimited:
        return -1
    allowed = budget.fraction * prompt_tokens * token_bytes if budget.fraction is not None else budget.tokens * token_bytes
    usable = allowed - prompt_tokens * per_token_meta_bytes
    return max(0, int(usable // (token_bytes + per_slot_meta_bytes)))


@dataclass(frozen=True)
class SplitSizes:
    """KVReviver's per-sequence part sizes, in tokens (slots for the Vague part)."""

    vague_slots: int
    candidate: int
    recent: int

    @property
    def total(self) -> int:
        return self.vague_slots + self.candidate + self.recent


def split_capacity(budget: Budget, capacity: int) -> SplitSizes:
    """Split ``capacity`` slots into Vague slots (a multiple of r), Candidate and Recent (slack included)."""
    vague_share, candidate_share, _ = budget.split
    vague = int(round(vague_share * capacity)) // budget.sketch_rows * budget.sketch_rows
    candidate = int(round(candidate_share * capacity))
    recent = capacity - vague - candidate
    return SplitSizes(vague_slots=vague, candidate=candidate, recent=recent)
