"""The full cache's static decode step on CUDA: attention over the masked tail, merged with the filled slots'.

The static layout (:class:`~kvreviver_core.methods.full.FullLayer` with ``static=True``) runs flash attention over
the slots that are always filled and must mask the last ``STATIC_CHUNK`` slots against a length kept on the device.
In torch that tail is some twenty small kernels a layer (casts, two products, the mask, a softmax, a log-sum-exp,
the merge). Replayed from a CUDA graph, each costs its launch gap: at 32k, batch 1, the torch tail added about as
much to a token as the flash attention itself (BENCHMARKS.md, issue 7). One program per (sequence, query head) here
reads the tail once, with an online softmax, and merges the flash partial by log-sum-exp, so the baseline that
KVReviver is measured against pays for its attention and not for this bookkeeping.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tail_attention(Q, K, V, HEAD_OUT, HEAD_LSE, OUT, LENGTH, start, slots, Hq, G, scaling,
                    stride_kb, stride_kh, stride_kn, HAS_HEAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # (sequence, query head), rows of Q / OUT (B * Hq, D)
    b, h = bh // Hq, bh % Hq
    kv = (b * stride_kb + (h // G) * stride_kh).to(tl.int64)
    di = tl.arange(0, D)
    q = tl.load(Q + bh * D + di).to(tl.float32) * scaling
    length = tl.load(LENGTH).to(tl.int32)
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for first in range(0, tl.minimum(slots, length - start), BLOCK):  # the filled slots' blocks only
        n = first + tl.arange(0, BLOCK)
        valid = (n < slots) & (start + n < length)
        entry = kv + n[:, None].to(tl.int64) * stride_kn + di[None, :]
        keys = tl.load(K + entry, mask=valid[:, None], other=0.0).to(tl.float32)
        logits = tl.where(valid, tl.sum(keys * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 0))
        rescale = tl.exp(m - m_new)
        weights = tl.exp(logits - m_new)
        values = tl.load(V + entry, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * rescale + tl.sum(weights[:, None] * values, 0)
        total = total * rescale + tl.sum(weights, 0)
        m = m_new
    if HAS_HEAD:  # flash's output is normalised: it weighs exp(its log-sum-exp) against the tail's total
        head_lse = tl.load(HEAD_LSE + bh)
        top = tl.maximum(m, head_lse)
        head_weight = tl.exp(head_lse - top)
        tail_weight = tl.exp(m - top)
        head = tl.load(HEAD_OUT + bh * D + di).to(tl.float32)
        out = (acc * tail_weight + head * head_weight) / (total * tail_weight + head_weight)
    else:
        out = acc / total
    tl.store(OUT + bh * D + di, out.to(OUT.dtype.element_ty))


def tail_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, length: torch.Tensor,
                   scaling: float, head: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One decode query's attention over the tail slots, merged with the filled slots' attention.

    Args:
        query: ``(B, Hq, 1, D)``.
        keys, values: the tail ``(B, Hkv, T, D)`` (a slice of the capacity buffers: any strides with a unit last
            one); slot ``n`` holds position ``start + n``.
        length: ``(1,)`` the device's count of filled positions; the tail's slots at or past it are masked.
        head: the filled slots' normalised output ``(B, Hq, 1, D)`` and its log-sum-exp ``(B, Hq, 1)`` (flash
            attention's), or None when the tail is all the cache.

    Returns the output ``(B, Hq, 1, D)`` in the query's dtype.
    """
    batch, heads, _, dim = query.shape
    if keys.stride(-1) != 1 or values.stride() != keys.stride() or dim & (dim - 1):
        raise ValueError("tail_attention needs keys and values of one layout, unit-stride rows and a power-of-2 "
                         "head_dim")
    q = query.reshape(batch * heads, dim).contiguous()
    out = torch.empty_like(q)
    head_out, head_lse = head if head is not None else (q, q)  # unread without a head
    _tail_attention[(batch * heads,)](
        q, keys, values, head_out.reshape(batch * heads, dim).contiguous(), head_lse.reshape(-1).contiguous(), out,
        length, start, keys.shape[2], heads, heads // keys.shape[1], scaling, keys.stride(0), keys.stride(1),
        keys.stride(2), HAS_HEAD=head is not None, D=dim, BLOCK=64,
    )
    return out.view(batch, heads, 1, dim)
