"""Tensor operations shared by the caches."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that sums and softmaxes over ``dtype`` inputs are taken in: fp32, or ``dtype`` if it is wider (fp64
    inputs, as the fp64 tests use, must not lose digits to fp32)."""
    return torch.promote_types(dtype, torch.float32)


def add_at(target: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> None:
    """``target[b, h, index[b, h, m]] += source[b, h, m]`` in place, in the same order on every run.

    ``scatter_add_`` on CUDA adds colliding entries with atomics in whatever order threads arrive, so a sketch's
    buckets (or CaM's merged values) differ in their last bits from run to run and greedy decoding can flip a token;
    ``index_put_`` with ``accumulate=True`` sorts the indices first and adds each slot's entries in order.

    Args:
        target: ``(batch, heads, slots, *rest)``, contiguous.
        index: ``(batch, heads, m)`` slots in ``[0, slots)``.
        source: ``(batch, heads, m, *rest)``.
    """
    batch, heads, slots = target.shape[:3]
    rest = target.shape[3:]
    base = torch.arange(batch * heads, device=index.device).view(batch, heads, 1) * slots
    flat = (base + index).reshape(-1)
    target.view(batch * heads * slots, *rest).index_put_((flat,), source.reshape(-1, *rest), accumulate=True)
