"""Scored prefill attention in Triton: the exact output and each key's attention mass, with no logits in memory.

The methods that score tokens (KVReviver, H2O, and those built on them) need, at prefill, the softmax
probabilities summed over the queries and over each KV head's query heads, ``(B, Hkv, N)``. The torch reference
(:func:`kvreviver_core.attention.scored_attention`) builds every chunk's fp32 logits in memory and passes over
them half a dozen times: on an H200, at 32k tokens, KVReviver's prefill took 20 s against the full cache's 1.8
(BENCHMARKS.md). Here the logits stay in registers:

1. ``_attend_rows``: grid ``(cdiv(T, ROW_BLOCK_M), B * Hq)``, one program per block of queries of one query head,
   flash attention's online softmax over the keys. Writes the output ``(B, T, Hq, D)`` and each query's
   log-sum-exp ``(B, Hq, T)`` (+inf for a query with nothing to attend, so that its probabilities come out 0; its
   output is 0).
2. ``_column_mass``: grid ``(cdiv(N, MASS_BLOCK_N), B * Hkv)``, one program per block of keys of one KV head. It
   takes the logits again, tile by tile, for every query head of the group and every scored query that may see
   those keys, and sums ``exp(logit - lse)``. Each program owns its columns, so no atomics.

Attention here is causal with the queries at the end of the keys (a query at ``N - T + i`` sees keys up to it),
intersected with the boolean mask when one is given, as HF's masks for a causal LM always are. The causal bound
lets both passes skip the tiles above the diagonal, and only the tiles across it are masked. Logits are accumulated
in fp32 (tensor cores; exact fp32 products for fp32 inputs). A pass whose plan needs more shared memory than the GPU
has takes :data:`FALLBACK_PLAN`, and where that does not fit either the call runs the torch path.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kvreviver_core.attention import scored_attention

# Each pass's tile (queries x keys), warps and software-pipelining stages: on an H200 at 32k tokens (Llama-2-7B
# shapes, bf16) the fastest of 6 plans for the row pass (25.5 ms, as SDPA's flash kernel alone) and of 8 for the
# column pass (15.9 ms), BENCHMARKS.md.
ROW_BLOCK_M, ROW_BLOCK_N, ROW_WARPS, ROW_STAGES = 128, 128, 8, 3
MASS_BLOCK_M, MASS_BLOCK_N, MASS_WARPS, MASS_STAGES = 128, 64, 4, 3
# The plan of a pass whose own needs more shared memory than the GPU has (an H100 or H200 has 227 KiB, an A100 163).
# Compiled for sm_90, the row pass's plan needs 224 KiB at head_dim 128 in bf16 (228 with a mask, so a padded batch
# takes this plan), 448 at 256 and 384 at 128 in fp32; this one needs at most 82, 162 and 112
# (benchmarks/scored_prefill_plans.py). Where even this one does not fit, the torch path runs.
FALLBACK_PLAN = (64, 64, 4, 2)


@triton.jit
def _tile_logits(q, K, key_stride, rows, cols, T, N, MASK, mask_t, mask_n, scaling, CAUSAL: tl.constexpr,
                 HAS_MASK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, IEEE: tl.constexpr):
    """The logits of query rows ``rows`` (q ``(BLOCK_M, DP)``) against key columns ``cols < N`` (keys from ``K``,
    rows ``key_stride`` apart), -inf where the query may not attend: with CAUSAL (a tile across the diagonal) past
    its own position or at a row ``>= T``; with HAS_MASK where the mask (``MASK`` at this head's plane, strides
    ``mask_t``, ``mask_n``) is False. A tile below the diagonal has no causal test: every row sees every column."""
    k = _load_rows(K, key_stride, cols, N, D, DP)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
    else:
        s = tl.dot(q, tl.trans(k)) * scaling
    inside = (rows < T)[:, None] & (cols < N)[None, :]
    if CAUSAL:
        s = tl.where(inside & (cols[None, :] <= rows[:, None] + (N - T)), s, float("-inf"))
    if HAS_MASK:
        tile = tl.load(MASK + rows[:, None].to(tl.int64) * mask_t + cols[None, :] * mask_n, mask=inside, other=0)
        s = tl.where(tile != 0, s, float("-inf"))
    return s


@triton.jit
def _load_rows(X, row_stride, rows, count, D: tl.constexpr, DP: tl.constexpr):
    """The ``(len(rows), DP)`` tile of query, key or value rows ``rows`` (``row_stride`` apart, the first ``count``
    real), zeros past the row count and past ``D``."""
    di = tl.arange(0, DP)
    return tl.load(X + rows[:, None] * row_stride + di[None, :], mask=(rows < count)[:, None] & (di < D)[None, :],
                   other=0.0)


@triton.jit
def _online_softmax(m, l, acc, s, v, IEEE: tl.constexpr):
    """Fold a tile's logits ``s`` (BLOCK_M, BLOCK_N) and values ``v`` (BLOCK_N, DP) into the rows' running max
    ``m``, sum of exponentials ``l`` and output ``acc`` (BLOCK_M, DP), fp32."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet stays at 0
    alpha = tl.exp(m - m_use)
    p = tl.exp(s - m_use[:, None])
    if IEEE:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + pv


@triton.jit
def _attend_tiles(m, l, acc, q, keys, kn, values, vn, rows, first, end, T, N, mask_plane, mask_t, mask_n, scaling,
                  CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                  BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Fold the key blocks from ``first`` to ``end`` into query rows ``rows``' online softmax."""
    for start in range(first, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = _tile_logits(q, keys, kn, rows, cols, T, N, mask_plane, mask_t, mask_n, scaling, CAUSAL, HAS_MASK, D, DP,
                         IEEE)
        m, l, acc = _online_softmax(m, l, acc, s, _load_rows(values, vn, cols, N, D, DP), IEEE)
    return m, l, acc


@triton.jit(do_not_specialize=["T", "N"])
def _attend_rows(Q, qb, qh, qt, K, kb, kh, kn, V, vb, vh, vn, OUT, ob, oh, ot, LSE, MASK, mask_b, mask_h, mask_t,
                 mask_n, T, N, scaling, Hq, G: tl.constexpr, HAS_MASK: tl.constexpr, D: tl.constexpr,
                 DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Grid ``(cdiv(T, BLOCK_M), B * Hq)``: OUT (rows ``ot`` apart) and LSE ``(B, Hq, T)`` of a block of queries."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // Hq, bh % Hq
    first_row = tl.program_id(0) * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + b * qb + h * qh, qt, rows, T, D, DP)
    keys = K + b * kb + (h // G) * kh
    values = V + b * vb + (h // G) * vh
    mask_plane = MASK + b * mask_b + (h // G) * mask_h
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DP), tl.float32)
    below = (first_row + (N - T) + 1) // BLOCK_N * BLOCK_N  # key blocks that every row of this block sees whole
    m, l, acc = _attend_tiles(m, l, acc, q, keys, kn, values, vn, rows, 0, below, T, N, mask_plane, mask_t, mask_n,
                              scaling, False, HAS_MASK, D, DP, BLOCK_N, IEEE)
    m, l, acc = _attend_tiles(m, l, acc, q, keys, kn, values, vn, rows, below,
                              tl.minimum(N, first_row + BLOCK_M + (N - T)), T, N, mask_plane, mask_t, mask_n, scaling,
                              True, HAS_MASK, D, DP, BLOCK_N, IEEE)
    seen = l > 0
    out = acc / tl.where(seen, l, 1.0)[:, None]  # 0 for a query with nothing to attend
    di = tl.arange(0, DP)
    tl.store(OUT + b * ob + h * oh + rows[:, None] * ot + di[None, :], out.to(OUT.dtype.element_ty),
             mask=(rows < T)[:, None] & (di < D)[None, :])
    tl.store(LSE + bh * T + rows, tl.where(seen, m + tl.log(l), float("inf")), mask=rows < T)


@triton.jit
def _mass_rows(total, queries, qt, lse_row, keys, kn, first, end, cols, T, N, mask_plane, mask_t, mask_n, scaling,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
               BLOCK_M: tl.constexpr, IEEE: tl.constexpr):
    """Add the probabilities of query rows ``[first, end)`` at key columns ``cols`` to ``total`` (BLOCK_N,)."""
    for start in range(first, end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_rows(queries, qt, rows, T, D, DP)
        s = _tile_logits(q, keys, kn, rows, cols, T, N, mask_plane, mask_t, mask_n, scaling, CAUSAL, HAS_MASK, D, DP,
                         IEEE)
        lse = tl.load(lse_row + rows, mask=rows < T, other=float("inf"))
        total += tl.sum(tl.exp(s - lse[:, None]), 0)
    return total


@triton.jit(do_not_specialize=["T", "N", "first_scored"])
def _column_mass(Q, qb, qh, qt, K, kb, kh, kn, LSE, SCORES, MASK, mask_b, mask_h, mask_t, mask_n, T, N,
                 first_scored, scaling, Hkv, G: tl.constexpr, HAS_MASK: tl.constexpr, D: tl.constexpr,
                 DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Grid ``(cdiv(N, BLOCK_N), B * Hkv)``: SCORES ``(B, Hkv, N)``, each key's probability summed over the scored
    queries of the KV head's G query heads. The key blocks with the most queries to see them run first."""
    bkv = tl.program_id(1).to(tl.int64)
    b, kv = bkv // Hkv, bkv % Hkv
    first_col = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_N
    cols = first_col + tl.arange(0, BLOCK_N)
    keys = K + b * kb + kv * kh
    mask_plane = MASK + b * mask_b + kv * mask_h
    first = tl.maximum(first_scored, first_col - (N - T))  # the first query that may see this block's first key
    # From ``below`` on (whole tiles from ``first``), every query sees the whole block: no causal test.
    sees_all = tl.maximum(first, first_col + BLOCK_N - 1 - (N - T))
    below = first + tl.cdiv(sees_all - first, BLOCK_M) * BLOCK_M
    total = tl.zeros((BLOCK_N,), tl.float32)
    for g in range(G):
        head = kv * G + g
        queries = Q + b * qb + head * qh
        lse_row = LSE + (b * Hkv * G + head) * T
        total = _mass_rows(total, queries, qt, lse_row, keys, kn, first, below, cols, T, N, mask_plane, mask_t,
                           mask_n, scaling, True, HAS_MASK, D, DP, BLOCK_M, IEEE)
        total = _mass_rows(total, queries, qt, lse_row, keys, kn, below, T, cols, T, N, mask_plane, mask_t, mask_n,
                           scaling, False, HAS_MASK, D, DP, BLOCK_M, IEEE)
    tl.store(SCORES + bkv * N + cols, total, mask=cols < N)


def scored_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    score_queries: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kvreviver_core.attention.scored_attention`'s arguments and results (the output ``(B, T, Hq, D)``, the
    scores ``(B, Hkv, N)`` fp32), on CUDA, for at least as many keys as queries; causal (see the module)."""
    b, hq, t, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    if n < t:
        raise ValueError(f"scored attention needs at least as many keys as queries, got {n} keys for {t} queries")
    first_scored = 0 if score_queries is None else max(0, t - score_queries)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, value))
    out = torch.empty(b, t, hq, d, dtype=query.dtype, device=query.device)
    scores = torch.zeros(b, hkv, n, dtype=torch.float32, device=query.device)
    lse = torch.empty(b, hq, t, dtype=torch.float32, device=query.device)
    if mask is None:
        mask_arg, mask_strides = lse, (0, 0, 0, 0)  # never read (HAS_MASK off)
    else:
        mask_arg = mask.view(torch.uint8)
        mask_strides = tuple(stride if size > 1 else 0 for size, stride in zip(mask.shape[:2], mask.stride()[:2]))
        mask_strides += (mask.stride(2), mask.stride(3))
    common = dict(G=hq // hkv, HAS_MASK=mask is not None, D=d, DP=triton.next_power_of_2(d),
                  IEEE=query.dtype == torch.float32)
    queries, keys = (q, *q.stride()[:3]), (k, *k.stride()[:3])
    # A model split over GPUs: launch on the inputs' one (CPU tensors run under Triton's interpreter).
    try:
        with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
            _launch(_attend_rows, (ROW_BLOCK_M, ROW_BLOCK_N, ROW_WARPS, ROW_STAGES),
                    lambda bm, bn: (triton.cdiv(t, bm), b * hq), *queries, *keys, v, *v.stride()[:3], out,
                    out.stride(0), out.stride(2), out.stride(1), lse, mask_arg, *mask_strides, t, n, scaling, hq,
                    **common)
            if first_scored < t:
                _launch(_column_mass, (MASS_BLOCK_M, MASS_BLOCK_N, MASS_WARPS, MASS_STAGES),
                        lambda bm, bn: (triton.cdiv(n, bn), b * hkv), *queries, *keys, lse, scores, mask_arg,
                        *mask_strides, t, n, first_scored, scaling, hkv, **common)
    except triton.OutOfResources:
        return scored_attention(query, key, value, mask, scaling, score_queries)
    return out, scores


def _launch(kernel, plan: tuple[int, int, int, int], grid, *args, **meta) -> None:
    """Launch ``kernel`` with ``plan`` (queries and keys a tile, warps, stages; ``grid(queries, keys)`` its grid), or
    with :data:`FALLBACK_PLAN` where the GPU has too little shared memory for it: Triton raises OutOfResources when it
    loads the compiled kernel, before anything runs."""
    for tried in dict.fromkeys((plan, FALLBACK_PLAN)):
        block_m, block_n, warps, stages = tried
        try:
            kernel[grid(block_m, block_n)](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                                           num_stages=stages)
            return
        except triton.OutOfResources:
            if tried == FALLBACK_PLAN:
                raise
