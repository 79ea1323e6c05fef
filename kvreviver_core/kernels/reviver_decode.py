"""Fused KVReviver decode attention in Triton: split-K flash-decoding over the exact slots and the Vague sketch.

One decode step (one query per sequence) reads only the compressed store:

* the exact slots (Recent + Candidate) ``(B, Hkv, E, D)`` and their positions;
* the Vague tokens, rebuilt on the fly inside the kernel from the sketch's ``r x b`` bucket rows: the position's
  buckets and signs are those of :meth:`kvreviver_core.sketch.VagueSketch.slots`, the key is the median of the r
  bucket keys (signed too with ``signed_keys``) and the value the median of the signed bucket values (divided by
  the bucket counts for ``"mean"``).

HBM traffic is the exact store, the sketch, a byte per position and KV head for the part map and the fp32 logits of
the query heads, so it follows the budget, not the context. The full K/V are never materialised. Under the paper's
median every Vague token still gathers 2r bucket vectors (3 keys, 3 values), which the L2 cache serves: at the
paper's split (90% of the tokens Vague at a 10% budget) that is about 2.8x the full cache's K/V bytes through L2,
and on an H200 that kernel is slower than SDPA over the full cache.

Under the sketch's linear combine (``combine="mean"``: the rows' estimates averaged) nothing is rebuilt. A Vague
token's logit is the mean of its r buckets' logits, and the Vague share of the output is the buckets' values
weighted by the softmax numerators of their tokens. So ``_bucket_logits`` takes the query's logit of every bucket,
the split-K pass reads 3 of those scalars per Vague position, ``_position_pass`` sums each bucket's (signed) weights,
and ``_bucket_values`` multiplies them by the bucket values: each bucket is read once, and on an H200 the kernel is
faster than SDPA over the full cache (BENCHMARKS.md, issue 7). There the split-K pass's programs of KV heads attend
the exact slots only, on a side stream, while a launch of the same kernel's other programs takes the bucket logits.
The Vague positions are a launch of their own
(``_vague_logits``), each program a range of positions and 8 query heads, so that a position's bucket logits
(slot-major) and its logits (position-major, for the bucket sums) are read and written 32 bytes at a time.

The part map ``(B, Hkv, L)`` int8 says what each position is for each KV head: ``MASKED`` (padding), ``VAGUE`` or
``EXACT`` (a sequence without sketch buckets attends its exact tokens only). A layer on the in-place decode path
(:mod:`.inplace_step`) keeps the part map and the positions' bucket codes up to date between steps; otherwise they
are built for the step:

0. ``_slot_map``: every position's r bucket slots and signs, ``(B, r, L)`` int32, hashed once for all KV heads;
1. the part map's copy and ``_mark_exact``.

Then the attention itself:

* ``_decode_split``: grid ``(B * Hkv, splits)``. Each program owns one KV head (all G query heads of its group,
   so keys are loaded once for the group) and one slice of the exact slots and of the positions (under the linear
   combine, the exact slots only, and a second launch's programs take the bucket logits). It runs an
   online softmax and writes its partial output, max and sum, plus the raw logit of every position it owns;
* under the linear combine, ``_vague_logits``: the Vague positions' logits, and their partial max and sum;
* under the linear combine, ``_position_pass``: the buckets' weights, and ``_bucket_values``: their product with the
  buckets' values, the Vague share of the output. This chain (bucket logits, Vague logits, weights, values) takes
  its softmax numerators relative to the heads' highest Vague logit, so it needs nothing of the exact splits: those
  run on the device's side stream (:mod:`.side_stream`) at the same time, and the combine joins them;
* ``_combine``: merges the splits into the output and turns the logits into each position's attention mass,
  summed over the group's query heads, reading the logits (4 bytes a head and position), never the K/V. On the
  in-place step, ``_position_pass`` adds the mass straight to the scores and ``_combine`` merges only the output
  (:mod:`.inplace_step`).

Under the linear combine (Hopper on) the chain on the current stream launches as programmatic dependents
(``PDL``): a kernel's programs start while the one before it ends, and wait for it (``gdc_wait``) before they read
what it may write or write anything; every program waits, so a kernel's end implies the end of the chain before it.
The bucket logits are a dependent of the in-place step's append; elsewhere the chain starts after them.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvreviver_core.kernels import side_stream
from kvreviver_core.kernels.reference import check_decode_inputs
from kvreviver_core.sketch import _MIX_1, _MIX_2, VagueSketch, _wrap64

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: no dependent launches (chain_launches)
    gdc_launch_dependents = gdc_wait = None

# The hash of VagueSketch.slots: x = pos * POS_MUL + row_terms[row], then _mix(x) (row_terms: the sketch's).
_POS_MUL = tl.constexpr(0x9E3779B1)
_M1 = tl.constexpr(_wrap64(_MIX_1))
_M2 = tl.constexpr(_wrap64(_MIX_2))

SUPPORTED_ROWS = (1, 3)  # 1 or 3 rows combined (median or mean); other row counts use the reference
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_EXACT = 32  # exact slots per loop step
BLOCK_VAGUE = 32  # positions per loop step (3 gathered rows each for keys and values)
# Positions per program of the combine's mass: on an H200 at batch 1 under the linear combine, 2048 took 108.0
# against 116.2 us for 1024 at 128k, and the same at 8k and 32k (BENCHMARKS.md, issue 7).
BLOCK_MASS = 2048
MAX_SPLITS = 128
PROGRAMS_PER_SM = 8  # split-K target: programs of the main kernel per multiprocessor
# The most under the linear combine, whose splits attend the exact slots only, beside the Vague chain: about one
# program per multiprocessor leaves the rest of each to the chain (on an H200 at batch 1, 1 program per SM was the
# fastest of 1, 2, 4 and 8 at 8k and 32k: BENCHMARKS.md, issue 7).
PROGRAMS_PER_SM_LINEAR = 1
# Under the linear combine at most about sqrt(SPLIT_BALANCE x exact blocks) splits a KV head: a split's chain of
# blocks read one after the other against the merge's cost per split. With 8 programs per SM (the exact splits not
# beside) the fastest on an H200 at batch 1 were 9, 17 and 33 splits at 8k, 32k and 128k (26, 103 and 410 blocks).
# At one program per SM and batch 1 the per-SM bound (5 splits on 132 SMs, 32 KV heads) binds from 6
# blocks on.
SPLIT_BALANCE = 3
NUM_WARPS = 4
# Warps of each exact-split program under the linear combine (beside the Vague chain). On an H200 at batch 1, 8
# were not faster than 4 at 8k, 32k or 128k, with 32 or 64 slots a block (BENCHMARKS.md, issue 7).
EXACT_WARPS = 4
NUM_STAGES = 2  # software pipelining depth of the main kernel's loops (Triton's default on NVIDIA: 3)
# And under the linear combine, for the split-K launches and _vague_logits: on an H200 at 32k and batch 1, 3 stages
# took 43.3 against 45.8 us a step (BENCHMARKS.md, issue 7).
NUM_STAGES_LINEAR = 3
SKIP_EMPTY = False  # skip the sketch gathers of position blocks without a Vague token (a branch in the loop)
EXACT_BESIDE = True  # under the linear combine, the exact splits on the side stream, beside the Vague chain
# The linear combine's chain on the current stream (Vague logits, bucket sums, bucket values, combine; and on the
# in-place step the bucket logits, after the append) as programmatic dependent launches (Hopper on,
# chain_launches): each kernel's programs start while the one before it finishes, and wait for it (gdc_wait)
# before they read what it may write.
PDL = True
BLOCK_SLOTS = 1024  # positions per program of _slot_map
BLOCK_LINEAR = 256  # positions per loop step of the linear combine's Vague programs (no vector gathers)
VAGUE_RANGES = 64  # position ranges per sequence for the linear combine's Vague programs (about: whole rows of splits)
MIN_VAGUE_RANGE = 512  # and the fewest positions in a range
VAGUE_HEADS = 8  # query heads per Vague program: a 32-byte sector of fp32 logits, at each position
BLOCK_BUCKETS = 64  # buckets per program of _bucket_logits and of _bucket_values
CHUNK_POSITIONS = 1024  # positions per program of _position_pass: Algorithm 3 rescans one such chunk at a swap
BLOCK_PASS = 1024  # positions per loop step of _position_pass (one step a chunk: no chain of dependent reads)
PASS_WARPS = 4
RUN_TILE = 4096  # (query heads x bucket order entries) per step of a bucket-run piece (_bucket_run_sums)
MASKED, VAGUE, EXACT = 0, 1, 2  # the part map's codes
_VAGUE = tl.constexpr(VAGUE)
SPLITS_PER_READ = 4  # partial outputs the combine reads at once
_SPLITS_PER_READ = tl.constexpr(SPLITS_PER_READ)
_EXACT = tl.constexpr(EXACT)


@triton.jit
def _mix(x):
    x = x ^ (x >> 31)
    x = x * _M1
    x = x ^ (x >> 29)
    x = x * _M2
    return x ^ (x >> 32)


@triton.jit
def _mark_exact(EPOS, PART, E, L, BLOCK: tl.constexpr):
    """Mark the exact slots' positions EXACT in the part map, where they are attendable (not MASKED)."""
    bh = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pos = tl.load(EPOS + bh * E + slots, mask=slots < E, other=-1)
    inside = (pos >= 0) & (pos < L)
    part = tl.load(PART + bh * L + pos, mask=inside, other=0)
    tl.store(PART + bh * L + pos, tl.full(pos.shape, _EXACT, tl.int8), mask=inside & (part == _VAGUE))


@triton.jit
def _bucket(logical, nb, width, ROW_TERMS, ROW: tl.constexpr):
    """Flat slot ``ROW * width + h_ROW(pos)`` and sign ``g_ROW(pos)`` of each position, as VagueSketch.slots."""
    mixed = _mix(logical * _POS_MUL + tl.load(ROW_TERMS + ROW))
    bucket = mixed % nb
    bucket = tl.where(bucket < 0, bucket + nb, bucket)  # Python's (torch.remainder's) sign convention
    return ROW * width + bucket, 1 - 2 * ((mixed >> 40) & 1)


@triton.jit
def _slot_code(logical, nb, width, ROW_TERMS, ROW: tl.constexpr):
    """int32 code ``2 * slot + (sign < 0)`` of row ROW's bucket for each logical position."""
    slot, sign = _bucket(logical, nb, width, ROW_TERMS, ROW)
    return (slot * 2 + (sign < 0).to(tl.int64)).to(tl.int32)


@triton.jit(do_not_specialize=["L"])
def _slot_map(SLOTS, BUCKETS, OFFSETS, ROW_TERMS, L, width, code_stride, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``(B, ROWS, >= L)`` int32 codes of positions ``[0, L)``, shared by all KV heads (rows ``code_stride`` apart)."""
    b = tl.program_id(0)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = p < L
    nb = tl.maximum(tl.load(BUCKETS + b), 1)  # a sequence without buckets has no Vague token to look up
    logical = p.to(tl.int64) - tl.load(OFFSETS + b)
    for row in tl.static_range(ROWS):
        tl.store(SLOTS + (b * ROWS + row).to(tl.int64) * code_stride + p,
                 _slot_code(logical, nb, width, ROW_TERMS, row), mask=inside)


@triton.jit
def _slot_of(SLOT_ROWS, p, vague, code_stride, ROW: tl.constexpr):
    code = tl.load(SLOT_ROWS + ROW * code_stride + p, mask=vague, other=0)
    return code >> 1, 1 - 2 * (code & 1)


@triton.jit
def _row_slots(SLOT_ROWS, p, vague, code_stride, ROWS: tl.constexpr):
    """Each position's bucket slot and sign in the sketch's 1 or 3 rows, from its codes."""
    slot0, sign0 = _slot_of(SLOT_ROWS, p, vague, code_stride, 0)
    slot1, sign1 = slot0, sign0
    slot2, sign2 = slot0, sign0
    if ROWS == 3:
        slot1, sign1 = _slot_of(SLOT_ROWS, p, vague, code_stride, 1)
        slot2, sign2 = _slot_of(SLOT_ROWS, p, vague, code_stride, 2)
    return slot0, slot1, slot2, sign0, sign1, sign2


@triton.jit
def _bucket_rows(S, SCNT, slot, sign, vague, di, dmask, D: tl.constexpr, MEAN: tl.constexpr, SIGNED: tl.constexpr):
    """One row's bucket vectors for each position, fp32 ``(BLOCK, DP)`` (times the sign for values).

    ``S`` and ``SCNT`` point at this KV head's buckets, so the offsets stay 32-bit.
    """
    x = tl.load(S + (slot[:, None] * D + di[None, :]), mask=vague[:, None] & dmask[None, :], other=0.0,
                eviction_policy="evict_last")
    if SIGNED:
        x = x * sign.to(x.dtype)[:, None]
    if MEAN:
        # torch divides in the storage dtype: the count is rounded to it first, and so is the quotient. The IEEE
        # division (div_rn) gives torch's quotient to the bit; "/" compiles to an approximate one.
        count = tl.maximum(tl.load(SCNT + slot, mask=vague, other=1), 1).to(x.dtype).to(tl.float32)
        x = tl.div_rn(x.to(tl.float32), count[:, None]).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _median_rows(S, SCNT, slot0, slot1, slot2, sign0, sign1, sign2, vague, di, dmask,
                 D: tl.constexpr, ROWS: tl.constexpr, MEAN: tl.constexpr, SIGNED: tl.constexpr):
    """Median over the sketch rows (1 or 3) of the bucket vectors: the reconstructed keys or values."""
    x = _bucket_rows(S, SCNT, slot0, sign0, vague, di, dmask, D, MEAN, SIGNED)
    if ROWS == 3:
        y = _bucket_rows(S, SCNT, slot1, sign1, vague, di, dmask, D, MEAN, SIGNED)
        z = _bucket_rows(S, SCNT, slot2, sign2, vague, di, dmask, D, MEAN, SIGNED)
        x = _median3(x, y, z)
    return x


@triton.jit
def _median3(a, b, c):
    return tl.maximum(tl.minimum(a, b), tl.minimum(tl.maximum(a, b), c))


@triton.jit
def _estimate_rows(S, SCNT, slot0, slot1, slot2, sign0, sign1, sign2, vague, di, dmask,
                   D: tl.constexpr, ROWS: tl.constexpr, MEAN: tl.constexpr, SIGNED: tl.constexpr,
                   LINEAR: tl.constexpr):
    """A token's estimate from the sketch rows (1 or 3): their median, or with LINEAR their mean, summed in fp32 in
    row order and divided once, as :func:`kvreviver_core.sketch.combine_rows`; rounded to the storage dtype."""
    if LINEAR:
        x = _bucket_rows(S, SCNT, slot0, sign0, vague, di, dmask, D, MEAN, SIGNED)
        if ROWS == 3:
            x = x + _bucket_rows(S, SCNT, slot1, sign1, vague, di, dmask, D, MEAN, SIGNED)
            x = x + _bucket_rows(S, SCNT, slot2, sign2, vague, di, dmask, D, MEAN, SIGNED)
        x = tl.div_rn(x, tl.full(x.shape, ROWS, tl.float32))
    else:
        x = _median_rows(S, SCNT, slot0, slot1, slot2, sign0, sign1, sign2, vague, di, dmask, D, ROWS, MEAN, SIGNED)
    return x.to(S.dtype.element_ty)


@triton.jit(do_not_specialize=["span", "pos_per_split", "columns", "vague_rows"])
def _vague_logits(QK, PART, part_stride, SLOTS, code_stride, LOGITS, VLOGITS, PART_M, PART_L, VAGUE_TOP, BUCKETS,
                  LENGTH, Hkv, span, width, pos_per_split, columns, vague_rows, head_groups, G: tl.constexpr,
                  ROWS: tl.constexpr, SIGNED_KEYS: tl.constexpr, HB: tl.constexpr, BLOCK: tl.constexpr,
                  CHAINED: tl.constexpr):
    """Linear combine, after :func:`_decode_split`: grid ``(B * head_groups * vague_rows, splits)``, a program per
    range of ``pos_per_split`` positions of one sequence ``b`` and ``HB`` query heads. A Vague position's logit is the
    sum over the rows of its buckets' (signed) logits, gathered from ``QK`` ``(B, slots, Hq)``: slot-major, so that
    one gather reads the logits of HB heads from one sector. They go to LOGITS ``(B, Hq, span)`` at the positions not
    held exactly and to VLOGITS ``(B, span, Hq)`` (-inf where not Vague); their running max and sum of exponentials
    to column ``splits + range`` of PART_M / PART_L, and their max to VAGUE_TOP (the heads' highest Vague logit, the
    reference of the Vague numerators: it reads nothing of the exact splits, which may still be running)."""
    program = tl.program_id(0)
    splits = tl.num_programs(1)
    vague_range = (program % vague_rows) * splits + tl.program_id(1)
    heads = ((program // vague_rows) % head_groups) * HB + tl.arange(0, HB)
    b = program // (vague_rows * head_groups)
    first = vague_range * pos_per_split
    L = tl.load(LENGTH).to(tl.int32)
    nb = tl.load(BUCKETS + b)
    Hq = Hkv * G
    slots = ROWS * width
    slot_rows = SLOTS + b.to(tl.int64) * ROWS * code_stride
    hmask = heads < Hq
    qh = b.to(tl.int64) * Hq + heads  # rows of LOGITS, PART_M, PART_L, VAGUE_TOP
    part_rows = PART + (b.to(tl.int64) * Hkv + heads // G)[:, None] * part_stride  # (HB, 1)
    qk_heads = QK + b.to(tl.int64) * slots * Hq + heads[:, None]  # (HB, 1)
    m = tl.full((HB,), float("-inf"), tl.float32)
    l = tl.zeros((HB,), tl.float32)
    if CHAINED:  # the bucket logits, and the part map and codes of the appended token
        gdc_wait()
    for start in range(0, tl.minimum(pos_per_split, L - first), BLOCK):
        p = first + start + tl.arange(0, BLOCK)
        inside = p < L
        both = hmask[:, None] & inside[None, :]
        kind = tl.load(part_rows + p[None, :], mask=both, other=_EXACT)
        # The codes and bucket logits of every position inside are read (small, cached), so that no read waits on
        # the part map.
        slot0, slot1, slot2, sign0, sign1, sign2 = _row_slots(slot_rows, p, inside, code_stride, ROWS)
        s = tl.load(qk_heads + slot0[None, :] * Hq, mask=both, other=0.0)
        if SIGNED_KEYS:
            s = s * sign0.to(tl.float32)[None, :]
        if ROWS == 3:
            s1 = tl.load(qk_heads + slot1[None, :] * Hq, mask=both, other=0.0)
            s2 = tl.load(qk_heads + slot2[None, :] * Hq, mask=both, other=0.0)
            if SIGNED_KEYS:
                s1 = s1 * sign1.to(tl.float32)[None, :]
                s2 = s2 * sign2.to(tl.float32)[None, :]
            s = s + s1 + s2
        s = tl.where((kind == _VAGUE) & (nb > 0), s, float("-inf"))
        m, l = _online_sum(m, l, s)
        tl.store(LOGITS + qh[:, None] * span + p[None, :], s, mask=both & (kind != _EXACT))
        tl.store(VLOGITS + (b.to(tl.int64) * span + p[None, :]) * Hq + heads[:, None], s, mask=both)
    if CHAINED:
        gdc_launch_dependents()
    column = splits + vague_range
    tl.store(PART_M + qh * columns + column, m, mask=hmask)
    tl.store(PART_L + qh * columns + column, l, mask=hmask)
    tl.atomic_max(VAGUE_TOP + qh, m, mask=hmask, sem="relaxed")


@triton.jit
def _bucket_logits(q, bh, block, SK, SCNT, QK, W, VAGUE_OUT, VAGUE_TOP, Hkv, slots, scale, G: tl.constexpr,
                   GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr,
                   CHAINED: tl.constexpr):
    """Linear combine, block ``block`` of KV head ``bh``'s buckets: their logits ``scale * q . key`` (``q`` the
    group's queries ``(GP, DP)``, ``scale`` = softmax scale / rows; divided by the bucket's count for MEAN), ``QK``
    ``(B, slots, Hq)`` fp32, and zeros in this step's bucket weights ``W`` ``(B, Hq, slots)`` (:func:`_position_pass`)
    and in the Vague share ``VAGUE_OUT`` ``(B, Hq, D)`` (:func:`_bucket_values`); -inf in the heads' highest Vague
    logits ``VAGUE_TOP`` ``(B, Hq)``, which :func:`_vague_logits` raises.

    CHAINED (launched as a dependent of the in-place step's append, which writes none of the query, keys and
    counts): the logits are taken while the append runs, and stored after it."""
    b, h = bh // Hkv, bh % Hkv
    gi, di = tl.arange(0, GP), tl.arange(0, DP)
    gmask, dmask = gi < G, di < D
    qh = h * G + gi
    j = block * BLOCK + tl.arange(0, BLOCK)
    jmask = j < slots
    head = bh.to(tl.int64) * slots
    k = tl.load(SK + (head + j)[:, None] * D + di[None, :], mask=jmask[:, None] & dmask[None, :], other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    if MEAN:
        qk = qk / tl.maximum(tl.load(SCNT + head + j, mask=jmask, other=1), 1).to(tl.float32)[None, :]
    if CHAINED:
        gdc_launch_dependents()
        gdc_wait()
    heads = b.to(tl.int64) * Hkv * G + qh  # query-head rows
    both = gmask[:, None] & jmask[None, :]
    tl.store(QK + (b.to(tl.int64) * slots + j[None, :]) * (Hkv * G) + qh[:, None], qk, mask=both)
    tl.store(W + heads[:, None] * slots + j[None, :], tl.zeros((GP, BLOCK), tl.float32), mask=both)
    if block == 0:
        tl.store(VAGUE_OUT + heads[:, None] * D + di[None, :], tl.zeros((GP, DP), tl.float32),
                 mask=gmask[:, None] & dmask[None, :])
        tl.store(VAGUE_TOP + heads, tl.full((GP,), float("-inf"), tl.float32), mask=gmask)


@triton.jit
def _rescale_to(m, m_new):
    """The reference to take exponentials against once the running max goes from ``m`` to ``m_new`` (0 while
    nothing has been seen, so that no -inf - -inf makes a NaN), and the factor that rescales what was summed
    before."""
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_use, tl.exp(m - m_use)


@triton.jit
def _online_rescale(m, s):
    """The running max after logits ``s`` (GP, BLOCK), the factor that rescales what was summed before, and the
    block's exponentials."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use, alpha = _rescale_to(m, m_new)
    return m_new, alpha, tl.exp(s - m_use[:, None])


@triton.jit
def _online_softmax(m, l, acc, s, v):
    """Fold logits ``s`` (GP, BLOCK) and values ``v`` (BLOCK, DP) into the running max, sum and output."""
    m_new, alpha, p = _online_rescale(m, s)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l, acc


@triton.jit
def _online_sum(m, l, s):
    """Fold logits ``s`` (rows, BLOCK) whose values are summed elsewhere (the linear combine's buckets) into the
    running max and sum."""
    m_new, alpha, p = _online_rescale(m, s)
    return m_new, l * alpha + tl.sum(p, 1)


@triton.jit
def _vague_block(q, m, l, acc, p, vague, SLOT_ROWS, code_stride, SK, SV, SCNT, di, dmask, scaling,
                 D: tl.constexpr, ROWS: tl.constexpr, MEAN: tl.constexpr, SIGNED_KEYS: tl.constexpr):
    """Rebuild one block of Vague positions from the sketch and fold it into the online softmax.

    Keys first, values after, so only one row triple of ``(BLOCK_V, DP)`` tiles is live at a time.
    """
    slot0, slot1, slot2, sign0, sign1, sign2 = _row_slots(SLOT_ROWS, p, vague, code_stride, ROWS)
    k = _median_rows(SK, SCNT, slot0, slot1, slot2, sign0, sign1, sign2, vague, di, dmask,
                     D, ROWS, MEAN, SIGNED_KEYS).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
    s = tl.where(vague[None, :], s, float("-inf"))
    v = _median_rows(SV, SCNT, slot0, slot1, slot2, sign0, sign1, sign2, vague, di, dmask,
                     D, ROWS, MEAN, True).to(q.dtype)
    m, l, acc = _online_softmax(m, l, acc, s, v)
    return s, m, l, acc


@triton.jit
def _slot_values(EK, EV, first_entry, slots, taken, di, dmask, D: tl.constexpr):
    """The keys and values of exact ``slots`` ``(BLOCK_E, DP)`` each (zeros where not ``taken``)."""
    offs = (first_entry + slots)[:, None] * D + di[None, :]
    both = taken[:, None] & dmask[None, :]
    return (tl.load(EK + offs, mask=both, other=0.0, eviction_policy="evict_first"),
            tl.load(EV + offs, mask=both, other=0.0, eviction_policy="evict_first"))


@triton.jit
def _exact_rows(q, EK, EV, SLOT_POS, part_row, logit_row, first_entry, E, first_slot, slots_per_split, scaling, di,
                dmask, D: tl.constexpr, DP: tl.constexpr, BLOCK_E: tl.constexpr):
    """One query head (a KV group of 1, ``q`` ``(DP,)`` fp32) over the exact slots ``[first_slot, first_slot +
    slots_per_split)`` of its KV head, on the CUDA cores: each of the BLOCK_E slot lanes keeps its own running max,
    sum and output, so that no step reduces across the program's warps (a tensor-core tile pads the head to 16 rows,
    and its online softmax reduces across warps at every step). The lanes merge at the end. The logits go to
    ``logit_row`` at the slots' positions. Returns the max, the sum of exponentials and the output ``(DP,)``
    relative to that max.

    Each step reads the next block's keys, values and part codes, and the positions of the block after it, before
    it takes its own products: by hand, since Triton pipelines only the loads that feed a dot, and a block's part
    codes are gathered at positions read one step before them. So no step waits on a read it issued."""
    end = first_slot + slots_per_split
    slots = first_slot + tl.arange(0, BLOCK_E)
    following = slots + BLOCK_E
    pos = tl.load(SLOT_POS + slots, mask=slots < E, other=-1)
    next_pos = tl.load(SLOT_POS + following, mask=(following < E) & (following < end), other=-1)
    kind = tl.load(part_row + pos, mask=pos >= 0, other=0)
    k, v = _slot_values(EK, EV, first_entry, slots, slots < E, di, dmask, D)
    m = tl.full((BLOCK_E,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_E,), tl.float32)
    acc = tl.zeros((BLOCK_E, DP), tl.float32)
    for _ in range(0, slots_per_split, BLOCK_E):
        after = following + BLOCK_E
        after_pos = tl.load(SLOT_POS + after, mask=(after < E) & (after < end), other=-1)
        next_kind = tl.load(part_row + next_pos, mask=next_pos >= 0, other=0)
        next_k, next_v = _slot_values(EK, EV, first_entry, following, (following < E) & (following < end), di, dmask,
                                      D)
        ok = (pos >= 0) & (kind == _EXACT)
        s = tl.where(ok, tl.sum(k.to(tl.float32) * q[None, :], 1) * scaling, float("-inf"))
        tl.store(logit_row + pos, s, mask=pos >= 0)
        m, l, acc = _slot_lanes_step(m, l, acc, s, v)
        pos, kind, k, v = next_pos, next_kind, next_k, next_v
        following, next_pos = after, after_pos
    top = tl.max(m, 0)
    _, weight = _rescale_to(m, top)
    return top, tl.sum(l * weight, 0), tl.sum(acc * weight[:, None], 0)


@triton.jit
def _slot_lanes_step(m, l, acc, s, v):
    """Fold one block's logits ``s`` (BLOCK_E,) and values ``v`` (BLOCK_E, DP) into the slot lanes' running max,
    sum and output, each lane its own (no reduction across the block)."""
    m_new = tl.maximum(m, s)
    m_use, alpha = _rescale_to(m, m_new)
    p = tl.exp(s - m_use)
    return m_new, l * alpha + p, acc * alpha[:, None] + p[:, None] * v.to(tl.float32)


@triton.jit(do_not_specialize=["span", "slots_per_split", "pos_per_split", "columns", "splits", "first_program"])
def _decode_split(
    Q, stride_qb, stride_qh,
    EK, EV, EPOS, PART, part_stride,
    SK, SV, SCNT, BUCKETS, SLOTS, code_stride, QK, W, VAGUE_OUT, VAGUE_TOP,
    LOGITS, PART_ACC, PART_M, PART_L, LENGTH,
    scaling, bucket_scale, Hkv, E, span, width, slots_per_split, pos_per_split, columns, splits, first_program,
    G: tl.constexpr, GP: tl.constexpr, VP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, ROWS: tl.constexpr,
    HAS_SKETCH: tl.constexpr, MEAN: tl.constexpr, SIGNED_KEYS: tl.constexpr, LINEAR: tl.constexpr,
    SKIP_EMPTY: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_B: tl.constexpr,
    CHAINED: tl.constexpr,
):
    """Grid ``(B * Hkv, programs)``: a program per KV head and split (``first_program`` + its index on the grid's
    second axis), whose partial results go to column ``split`` of PART_M / PART_L (rows ``columns`` apart) and of
    PART_ACC (rows ``splits`` apart). The query products run on tensor cores, whose tiles have GP >= 16 rows (on
    an H200 the CUDA cores were slower even for one query head: 449 against 331 us at 128k, with an online softmax
    over the tile), except over the exact slots of a group of one query head: :func:`_exact_rows`, whose slot lanes
    each keep their own softmax. The positions' loop keeps VP rows: GP for the median's rebuilt keys (products
    too), else the group's own (``next_power_of_2(G)``), so a small group does not carry 16 rows of logits per
    position.

    Under LINEAR these programs attend the exact slots only, and the ``cdiv(ROWS * width, BLOCK_B)`` programs past
    ``splits`` take the buckets' logits (:func:`_bucket_logits`, scaled by ``bucket_scale``): a launch of their own
    (``first_program = splits``), since neither waits on the other. The Vague positions are :func:`_vague_logits`'s,
    a launch of its own after the bucket logits, so that its programs' registers (a position's gathers for several
    heads) do not limit how many of these run at once. CHAINED: a launch of bucket-logit programs only, as a
    dependent of the in-place step's append."""
    bh = tl.program_id(0)
    split = first_program + tl.program_id(1)
    L = tl.load(LENGTH).to(tl.int32)  # positions to attend; the grid covers span >= L of them
    b = bh // Hkv
    h = bh % Hkv
    bh64 = bh.to(tl.int64)
    gi = tl.arange(0, GP)
    di = tl.arange(0, DP)
    gmask = gi < G
    dmask = di < D
    qh = h * G + gi
    q = tl.load(Q + b.to(tl.int64) * stride_qb + qh[:, None] * stride_qh + di[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if LINEAR:
        if split >= splits:
            _bucket_logits(q, bh, split - splits, SK, SCNT, QK, W, VAGUE_OUT, VAGUE_TOP, Hkv, ROWS * width,
                           bucket_scale, G, GP, D, DP, MEAN, BLOCK_B, CHAINED)
            return
    logit_rows = LOGITS + (b.to(tl.int64) * Hkv * G + qh)[:, None] * span  # (GP, 1) row starts
    part_row = PART + bh64 * part_stride

    # Exact slots (Recent + Candidate): one contiguous slice of the slots.
    if G == 1:
        top, total, out = _exact_rows(
            tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + di, mask=dmask, other=0.0).to(tl.float32),
            EK, EV, EPOS + bh64 * E, part_row, LOGITS + bh64 * span, bh64 * E, E, split * slots_per_split,
            slots_per_split, scaling, di, dmask, D, DP, BLOCK_E)
        first_row = gi == 0
        m = tl.where(first_row, top, float("-inf"))
        l = tl.where(first_row, total, 0.0)
        acc = tl.where(first_row[:, None], out[None, :], 0.0)
    else:
        m = tl.full((GP,), float("-inf"), tl.float32)
        l = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, DP), tl.float32)
        for start in range(0, slots_per_split, BLOCK_E):
            slots = split * slots_per_split + start + tl.arange(0, BLOCK_E)
            pos = tl.load(EPOS + bh64 * E + slots, mask=slots < E, other=-1)
            ok = (pos >= 0) & (tl.load(part_row + pos, mask=pos >= 0, other=0) == _EXACT)
            # Every slot's K/V is loaded, attended or not (empty slots hold zeros or a folded token's finite K/V, and
            # their probability is 0): the loads then wait on no other load, and the logits are masked below.
            k, v = _slot_values(EK, EV, bh64 * E, slots, slots < E, di, dmask, D)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
            s = tl.where(ok[None, :], s, float("-inf"))
            tl.store(logit_rows + pos[None, :], s, mask=gmask[:, None] & (pos >= 0)[None, :])
            m, l, acc = _online_softmax(m, l, acc, s, v)

    if not LINEAR:
        # Every position not held exactly: Vague (rebuilt from the sketch) or masked. Each is written exactly once.
        vi = tl.arange(0, VP)
        vmask = vi < G
        position_rows = (b.to(tl.int64) * Hkv * G + h * G + vi)[:, None] * span  # (VP, 1) row starts of LOGITS
        nb = tl.load(BUCKETS + b)
        sbase = bh64 * (ROWS * width)  # this KV head's first bucket
        head_keys, head_values, head_counts = SK + sbase * D, SV + sbase * D, SCNT + sbase
        slot_rows = SLOTS + b.to(tl.int64) * ROWS * code_stride
        for start in range(0, tl.minimum(pos_per_split, L - split * pos_per_split), BLOCK_V):
            p = split * pos_per_split + start + tl.arange(0, BLOCK_V)
            inside = p < L
            kind = tl.load(part_row + p, mask=inside, other=_EXACT)
            free = kind != _EXACT
            vague = (kind == _VAGUE) & (nb > 0)
            s = tl.full((VP, BLOCK_V), float("-inf"), tl.float32)
            if HAS_SKETCH:
                if SKIP_EMPTY:
                    if tl.max(vague.to(tl.int32), 0) > 0:
                        s, m, l, acc = _vague_block(q, m, l, acc, p, vague, slot_rows, code_stride,
                                                    head_keys, head_values, head_counts, di, dmask, scaling, D,
                                                    ROWS, MEAN, SIGNED_KEYS)
                else:
                    s, m, l, acc = _vague_block(q, m, l, acc, p, vague, slot_rows, code_stride,
                                                head_keys, head_values, head_counts, di, dmask, scaling, D, ROWS,
                                                MEAN, SIGNED_KEYS)
            tl.store(LOGITS + position_rows + p[None, :], s, mask=vmask[:, None] & free[None, :])

    rows = bh64 * G + gi  # (GP,) query-head rows
    tl.store(PART_M + rows * columns + split, m, mask=gmask)
    tl.store(PART_L + rows * columns + split, l, mask=gmask)
    tl.store(PART_ACC + (rows * splits + split)[:, None] * D + di[None, :], acc, mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _split_totals(PART_M, PART_L, rows, gmask, columns, SP: tl.constexpr):
    """The query heads' overall max and 1 / softmax denominator over the ``columns`` partial results of each
    (``SP >= columns``): the splits' and, under the linear combine, the Vague ranges'."""
    si = tl.arange(0, SP)
    pmask = gmask[:, None] & (si < columns)[None, :]
    part_m = tl.load(PART_M + rows[:, None] * columns + si[None, :], mask=pmask, other=float("-inf"))
    part_l = tl.load(PART_L + rows[:, None] * columns + si[None, :], mask=pmask, other=0.0)
    top = tl.max(part_m, 1)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(part_l * tl.exp(part_m - top[:, None]), 1)
    inv = tl.where(total > 0, 1.0 / total, 0.0)  # a query with nothing to attend gets 0, as the reference does
    return top, inv


@triton.jit
def _vague_reference(VAGUE_TOP, rows, mask):
    """The linear combine's reference for the Vague softmax numerators of the query heads ``rows``: their highest
    Vague logit (0 without one, as :func:`_split_totals`' top). It is at most the overall max, so the combine's
    rescaling of the Vague share cannot overflow."""
    top = tl.load(VAGUE_TOP + rows, mask=mask, other=float("-inf"))
    return tl.where(top == float("-inf"), 0.0, top)


@triton.jit
def _bucket_values(W, SV, SCNT, VAGUE_OUT, Hkv, slots, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                   DP: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr, CHAINED: tl.constexpr):
    """Linear combine, after ``_position_pass``: grid ``(B * Hkv, cdiv(slots, BLOCK))``. One block of buckets'
    weights ``W`` ``(B, Hq, slots)`` (each bucket's Vague softmax numerators, signed; divided by the counts for
    MEAN) times their values, added into the Vague share of the output ``VAGUE_OUT`` ``(B, Hq, D)`` fp32 (before
    normalisation; zeroed by ``_bucket_logits``). A grid, because one program per head waited on one block of
    values after the other: ``slots / BLOCK`` reads in a row, 20 at 128k."""
    if CHAINED:
        gdc_wait()
    bh = tl.program_id(0).to(tl.int64)
    gi, di = tl.arange(0, GP), tl.arange(0, DP)
    gmask, dmask = gi < G, di < D
    rows = bh * G + gi
    head = bh * slots  # the KV head's first bucket
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    jmask = j < slots
    w = tl.load(W + rows[:, None] * slots + j[None, :], mask=gmask[:, None] & jmask[None, :], other=0.0)
    if MEAN:
        w = w / tl.maximum(tl.load(SCNT + head + j, mask=jmask, other=1), 1).to(tl.float32)[None, :]
    v = tl.load(SV + (head + j)[:, None] * D + di[None, :], mask=jmask[:, None] & dmask[None, :], other=0.0)
    if SV.dtype.element_ty == tl.float32:
        out = tl.dot(w, v, input_precision="ieee")
    else:  # the weights rounded to the values' dtype, as the exact tokens' probabilities are (tensor cores)
        out = tl.dot(w.to(v.dtype), v)
    tl.atomic_add(VAGUE_OUT + rows[:, None] * D + di[None, :], out, mask=gmask[:, None] & dmask[None, :],
                  sem="relaxed")


@triton.jit
def _combine_output(PART_ACC, PART_M, OUT, rows, gmask, top, inv, columns, splits, VAGUE_OUT, VAGUE_TOP,
                    GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, SP: tl.constexpr, ROWS: tl.constexpr,
                    LINEAR: tl.constexpr):
    """Merge the ``splits`` partial outputs (the first columns of PART_M, whose rows are ``columns`` apart; SP >=
    splits) into the attention output of the query heads ``rows`` (with LINEAR, plus the Vague tokens' share
    ``VAGUE_OUT`` that ``_bucket_values`` summed relative to the heads' highest Vague logit ``VAGUE_TOP``).

    The splits are read ``SPLITS_PER_READ`` at a time in an unrolled loop, so the reads do not wait on each other
    (a loop of one split at a time waited on one read after the other: ~0.4 us each)."""
    di = tl.arange(0, DP)
    dmask = di < D
    out = tl.zeros((GP, DP), tl.float32)
    for first in tl.static_range(0, SP, _SPLITS_PER_READ):
        si = first + tl.arange(0, _SPLITS_PER_READ)
        taken = gmask[:, None] & (si < splits)[None, :]  # (GP, S)
        part_rows = rows[:, None] * splits + si[None, :]
        weight = tl.exp(tl.load(PART_M + rows[:, None] * columns + si[None, :], mask=taken, other=float("-inf"))
                        - top[:, None])
        part = tl.load(PART_ACC + part_rows[:, :, None] * D + di[None, None, :],
                       mask=taken[:, :, None] & dmask[None, None, :], other=0.0)
        out += tl.sum(part * weight[:, :, None], 1)
    outputs = rows[:, None] * D + di[None, :]
    both = gmask[:, None] & dmask[None, :]
    if LINEAR:
        vague_top = tl.load(VAGUE_TOP + rows, mask=gmask, other=float("-inf"))
        # Without a Vague logit the share is 0, and exp(0 - top) could overflow.
        rescale = tl.where(vague_top == float("-inf"), 0.0, tl.exp(vague_top - top))
        out += tl.load(VAGUE_OUT + outputs, mask=both, other=0.0) * (rescale / ROWS)[:, None]
    out = out * inv[:, None]
    tl.store(OUT + outputs, out.to(OUT.dtype.element_ty), mask=both)


@triton.jit
def _position_mass(LOGITS, rows, gmask, p, inside, top, inv, stride):
    """Each position's attention probability summed over the query heads ``rows``."""
    logits = tl.load(LOGITS + rows[:, None] * stride + p[None, :], mask=gmask[:, None] & inside[None, :], other=float("-inf"))
    return tl.sum(tl.exp(logits - top[:, None]) * inv[:, None], 0)


@triton.jit(do_not_specialize=["span"])
def _combine(
    LOGITS, PART_ACC, PART_M, PART_L, OUT, MASS, VAGUE_OUT, VAGUE_TOP, LENGTH, span, columns, splits,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, SP: tl.constexpr, SPA: tl.constexpr,
    ROWS: tl.constexpr, LINEAR: tl.constexpr, WITH_MASS: tl.constexpr, BLOCK: tl.constexpr, CHAINED: tl.constexpr,
):
    """Grid ``(B * Hkv, cdiv(span, BLOCK))``: the splits merged into the output (the first program of each KV
    head) and, WITH_MASS, each position's attention mass. Without it (the in-place step, whose position pass takes
    the mass) the grid is ``(B * Hkv, 1)``."""
    if CHAINED:
        gdc_wait()
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    gi = tl.arange(0, GP)
    gmask = gi < G
    rows = bh * G + gi  # query heads of this KV group
    top, inv = _split_totals(PART_M, PART_L, rows, gmask, columns, SP)
    if blk == 0:
        _combine_output(PART_ACC, PART_M, OUT, rows, gmask, top, inv, columns, splits, VAGUE_OUT, VAGUE_TOP, GP, D,
                        DP, SPA, ROWS, LINEAR)
    if WITH_MASS:
        p = blk * BLOCK + tl.arange(0, BLOCK)
        attended = p < tl.load(LENGTH).to(tl.int32)
        mass = tl.where(attended, _position_mass(LOGITS, rows, gmask, p, attended, top, inv, span), 0.0)
        tl.store(MASS + bh * span + p, mass, mask=p < span)


@triton.jit
def _highest_vague(score, vague, first):
    """The highest score among the Vague entries of a block of positions from ``first`` on, and its position (the
    first of equal ones; -inf and -1 without a Vague entry)."""
    score = tl.where(vague, score, float("-inf"))
    high = tl.max(score, 0)
    return high, tl.where(high > float("-inf"), first + tl.argmax(score, 0), -1).to(tl.int32)


@triton.jit
def _bucket_run_sums(VLOGITS, ORDER, ORDER_CODES, RUNS, W, VAGUE_TOP, run, batch, span, Hq, slots, width, sorted_n,
                     pieces, HP: tl.constexpr, ROWS: tl.constexpr, PIECE: tl.constexpr):
    """Linear combine, piece ``run % pieces`` of one bucket's run in its row's bucket order ``ORDER`` /
    ``ORDER_CODES`` ``(B, ROWS, sorted_n)``: add the signed softmax numerators ``exp(logit - vague max)`` of the Vague
    positions among those entries to the bucket's weight ``W`` ``(B, Hq, slots)``, for every query head at once
    (``HP >= Hq``), from the Vague logits ``VLOGITS`` ``(B, span, Hq)`` (-inf where not Vague). The order lists
    positions by bucket, and ``RUNS`` ``(B, ROWS, width + 1)`` says where each bucket's run starts, so a piece is a sum
    of ``PIECE`` entries (the last piece takes the rest of its run): no scan across entries, and one atomic add per
    head and piece. Offsets within a sequence are int32 (span x Hq and Hq x slots stay far below 2**31)."""
    bucket_slot = run // pieces
    if bucket_slot >= batch * slots:
        return
    piece = run % pieces
    b = bucket_slot // slots
    slot = bucket_slot % slots
    row, bucket = slot // width, slot % width
    run_row = RUNS + (b * ROWS + row).to(tl.int64) * (width + 1)
    end = tl.load(run_row + bucket + 1)
    first = tl.load(run_row + bucket) + piece * PIECE
    if piece < pieces - 1:
        end = tl.minimum(end, first + PIECE)
    if first >= end:
        return
    heads = tl.arange(0, HP)
    hmask = heads < Hq
    top = _vague_reference(VAGUE_TOP, b * Hq + heads, hmask)
    entries = (b * ROWS + row).to(tl.int64) * sorted_n
    logit_rows = VLOGITS + b.to(tl.int64) * span * Hq + heads[None, :]  # (1, HP)
    total = tl.zeros((HP,), tl.float32)
    for start in range(first, end, PIECE):
        idx = start + tl.arange(0, PIECE)
        listed = idx < end
        pos = tl.load(ORDER + entries + idx, mask=listed, other=0)
        sign = 1 - 2 * (tl.load(ORDER_CODES + entries + idx, mask=listed, other=0) & 1)
        logits = tl.load(logit_rows + pos[:, None] * Hq, mask=listed[:, None] & hmask[None, :], other=float("-inf"))
        total += tl.sum(tl.exp(logits - top[None, :]) * sign.to(tl.float32)[:, None], 0)
    tl.atomic_add(W + (b * Hq + heads) * slots + slot, total, mask=hmask, sem="relaxed")


@triton.jit(do_not_specialize=["chunks", "sorted_n", "pieces"])
def _position_pass(
    LOGITS, VLOGITS, PART_M, PART_L, VAGUE_TOP, MASS, PART, CODES, ORDER, ORDER_CODES, RUNS, W, SCORES, CHUNK_TOP,
    CHUNK_POS, LENGTH, batch, Hkv, span, row_stride, mass_stride, code_stride, sorted_n, slots, width, pieces, columns,
    chunks, G: tl.constexpr, GP: tl.constexpr, HP: tl.constexpr, SP: tl.constexpr, ROWS: tl.constexpr,
    FROM_LOGITS: tl.constexpr, LINEAR: tl.constexpr, SCORE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    PIECE: tl.constexpr, CHAINED: tl.constexpr,
):
    """One pass over the positions, ``CHUNK`` per program, after the split-K pass: grid ``(B * Hkv, chunks)``, and
    with a bucket order ``(B * Hkv + cdiv(B * slots * pieces, chunks), chunks)``.

    * With LINEAR, adds each Vague position's softmax numerator ``exp(logit - vague max)`` (the heads' highest
      Vague logit ``VAGUE_TOP`` ``(B, Hq)``), times its sign, to its bucket's weight in each row ``W``
      ``(B, Hq, slots)``: what ``_bucket_values`` multiplies by the buckets' values.
      The first ``sorted_n`` positions go through their :class:`BucketOrder` ``ORDER`` / ``ORDER_CODES`` / ``RUNS``,
      ``pieces`` programs a bucket (:func:`_bucket_run_sums`), each for all ``HP >= Hq`` query heads of its sequence:
      the programs past ``B * Hkv`` in the grid's first axis. The later positions go one by one (without SCORE, the
      programs of chunks the order lists whole return at once).
    * With SCORE, adds the step's attention mass to the cumulative scores ``(B, Hkv, >= N)`` (rows
      ``row_stride`` apart, as the part map's), from the logits (FROM_LOGITS) or from ``MASS`` (rows
      ``mass_stride`` apart), and writes the chunk's highest Vague score and its first position to ``CHUNK_TOP`` /
      ``CHUNK_POS`` ``(B * Hkv, chunks)``, which Algorithm 3 (``inplace_step._compress``) starts from.
    """
    if CHAINED:  # in every program, those that return early too: a dependent's end implies its predecessor's
        gdc_wait()
    chunk = tl.program_id(1)
    if LINEAR:
        if tl.program_id(0) >= batch * Hkv:
            _bucket_run_sums(VLOGITS, ORDER, ORDER_CODES, RUNS, W, VAGUE_TOP,
                             (tl.program_id(0) - batch * Hkv) * chunks + chunk, batch, span, Hkv * G, slots, width,
                             sorted_n, pieces, HP, ROWS, PIECE)
            return
    if LINEAR and not SCORE:
        if (chunk + 1) * CHUNK <= sorted_n:  # every position listed in the order: the order programs sum them
            return
    bh = tl.program_id(0).to(tl.int64)
    b = bh // Hkv
    N = tl.load(LENGTH).to(tl.int32)
    gi = tl.arange(0, GP)
    gmask = gi < G
    rows = bh * G + gi
    top = tl.zeros((GP,), tl.float32)
    inv = tl.zeros((GP,), tl.float32)
    if FROM_LOGITS and SCORE:  # the mass, over every split: the exact ones have been joined (position_pass)
        top, inv = _split_totals(PART_M, PART_L, rows, gmask, columns, SP)
    vague_top = top
    if LINEAR:  # the Vague numerators need none of the exact splits, which may still be running
        vague_top = _vague_reference(VAGUE_TOP, rows, gmask)
    code_rows = CODES + b * ROWS * code_stride
    part_row = PART + bh * row_stride
    best = tl.full((), float("-inf"), tl.float32)
    best_pos = tl.full((), -1, tl.int32)
    for start in tl.static_range(0, CHUNK, BLOCK):
        p = chunk * CHUNK + start + tl.arange(0, BLOCK)
        inside = p < N
        kind = tl.load(part_row + p, mask=inside, other=0)
        vague = inside & (kind == _VAGUE)
        if FROM_LOGITS:
            read = vague  # without SCORE, not the exact positions' logits, which the exact splits may be writing
            if SCORE:
                read = inside
            logits = tl.load(LOGITS + rows[:, None] * span + p[None, :], mask=gmask[:, None] & read[None, :],
                             other=float("-inf"))
            if LINEAR:
                unlisted = vague & (p >= sorted_n)  # Vague since the order was built
                numerators = tl.exp(logits - vague_top[:, None])
                for code_row in tl.static_range(ROWS):
                    slot, sign = _slot_of(code_rows, p, unlisted, code_stride, code_row)
                    tl.atomic_add(W + rows[:, None] * slots + slot[None, :], numerators * sign.to(tl.float32)[None, :],
                                  mask=gmask[:, None] & unlisted[None, :], sem="relaxed")
            mass = tl.sum(tl.exp(logits - top[:, None]) * inv[:, None], 0)
        else:
            mass = tl.load(MASS + bh * mass_stride + p, mask=inside, other=0.0)
        if SCORE:
            score = tl.load(SCORES + bh * row_stride + p, mask=inside, other=0.0) + mass
            tl.store(SCORES + bh * row_stride + p, score, mask=inside)
            high, high_pos = _highest_vague(score, vague, chunk * CHUNK + start)
            best_pos = tl.where(high > best, high_pos, best_pos)
            best = tl.maximum(best, high)
    if SCORE:
        tl.store(CHUNK_TOP + bh * chunks + chunk, best)
        tl.store(CHUNK_POS + bh * chunks + chunk, best_pos)


def chunk_tops(heads: int, span: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers for :func:`position_pass`'s highest Vague score of each chunk of ``span`` positions and its position,
    ``(heads, chunks)`` fp32 and int32."""
    chunks = triton.cdiv(span, CHUNK_POSITIONS)
    return (torch.empty(heads, chunks, dtype=torch.float32, device=device),
            torch.empty(heads, chunks, dtype=torch.int32, device=device))


class BucketOrder(NamedTuple):
    """The first positions of each row listed by bucket (:func:`bucket_order`)."""

    positions: torch.Tensor  # (B, r, n) int32, stably sorted by bucket
    codes: torch.Tensor  # (B, r, n) int32, their codes
    runs: torch.Tensor  # (B, r, width + 1) int32, where each bucket's run starts in its row (and where the last ends)


def bucket_order(codes: torch.Tensor, length: int, width: int) -> BucketOrder:
    """The first ``length`` positions of each row listed by bucket, from the bucket codes ``(B, r, >= length)`` of
    :func:`slot_codes` (slots ``row * width + bucket``). A position's buckets never change, so the linear combine's
    position pass sums each bucket's weights over its run of this order."""
    head = codes[:, :, :length]
    order = torch.sort(head >> 1, dim=-1, stable=True).indices
    ordered_codes = head.gather(-1, order).contiguous()
    b, rows = codes.shape[:2]
    slot = torch.arange(rows, dtype=torch.int32, device=codes.device).view(rows, 1) * width
    bounds = slot + torch.arange(width + 1, dtype=torch.int32, device=codes.device)  # each row's first slots
    runs = torch.searchsorted((ordered_codes >> 1).contiguous(), bounds.expand(b, rows, width + 1).contiguous())
    return BucketOrder(order.to(torch.int32).contiguous(), ordered_codes, runs.to(torch.int32).contiguous())


def kernel_unsupported(query: torch.Tensor, sketch: VagueSketch | None) -> str | None:
    """Why the Triton kernel cannot run these inputs (then use the reference), or None when it can."""
    if query.device.type != "cuda":
        return "the Triton kernel runs on CUDA only"
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} is not supported by the kernel"
    if sketch is not None and sketch.width == 0:
        return "no sequence of the batch has sketch buckets (the kernel is written for a non-empty sketch)"
    if sketch is not None and sketch.rows not in SUPPORTED_ROWS:
        return f"the kernel combines {' or '.join(map(str, SUPPORTED_ROWS))} sketch rows, not {sketch.rows}"
    return None


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def chain_launches(device: torch.device) -> bool:
    """Whether the linear combine's chain can launch as programmatic dependents (:data:`PDL`) on ``device``:
    Hopper's grid dependency control, compiled (not under Triton's interpreter)."""
    if not PDL or gdc_wait is None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def tile_pad(n: int) -> int:
    """A tile dimension for ``n`` rows or columns: a power of 2, and at least the 16 that ``tl.dot`` takes."""
    return max(16, triton.next_power_of_2(n))


def run_piece(heads_pad: int) -> int:
    """Bucket-order entries per piece of a bucket's run in the bucket sums, for ``heads_pad`` query heads a
    program."""
    return max(16, RUN_TILE // heads_pad)


def _split_plan(work_items: int, programs: int, per_sm: int, device: torch.device) -> int:
    """Splits per KV head: ``per_sm`` programs per multiprocessor, never more than there are blocks of work."""
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(MAX_SPLITS, triton.cdiv(per_sm * sms, programs), work_items))


def slot_codes(sketch: VagueSketch, length: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Every position's r bucket codes ``(B, r, length)`` int32, or written into ``out`` ``(B, r, >= length)``."""
    b = sketch.keys.shape[0]
    if out is None:
        out = torch.empty(b, sketch.rows, length, dtype=torch.int32, device=sketch.keys.device)
    with torch.cuda.device(out.device):
        _slot_map[(b, triton.cdiv(length, BLOCK_SLOTS))](
            out, sketch.buckets, sketch.offsets, sketch.row_terms, length, sketch.width, out.stride(1),
            ROWS=sketch.rows, BLOCK=BLOCK_SLOTS,
        )
    return out


def part_map(exact_pos: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, L)`` int8 part map of a store: VAGUE where ``key_valid``, EXACT at the exact slots' positions
    that are valid, MASKED elsewhere."""
    b, hkv, e = exact_pos.shape
    length = key_valid.shape[1]
    part = key_valid.to(torch.int8).unsqueeze(1).expand(b, hkv, length).contiguous()
    if e:
        with torch.cuda.device(part.device):
            _mark_exact[(b * hkv, triton.cdiv(e, 1024))](exact_pos.to(torch.int32).contiguous(), part, e, length,
                                                          BLOCK=1024)
    return part


def reviver_decode_triton(
    query: torch.Tensor,
    exact_keys: torch.Tensor,
    exact_values: torch.Tensor,
    exact_pos: torch.Tensor,
    sketch: VagueSketch | None,
    key_valid: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel. Same arguments and results as :func:`~kvreviver_core.kernels.reference.reviver_decode_reference`.

    Args:
        query: ``(B, Hq, 1, D)``; exact_keys, exact_values: ``(B, Hkv, E, D)``; exact_pos: ``(B, Hkv, E)`` int
            (-1 = empty); sketch: the Vague part or None; key_valid: ``(B, L)`` bool; scaling: softmax scale.

    Returns:
        output ``(B, 1, Hq, D)`` in the query's dtype and the mass ``(B, Hkv, L)`` fp32.
    """
    check_decode_inputs(query, exact_keys, exact_values, exact_pos, sketch, key_valid)
    reason = kernel_unsupported(query, sketch)
    if reason is not None:
        raise ValueError(reason)
    # Triton launches on the current CUDA device: under a device map that is not always this layer's GPU.
    length = key_valid.shape[1]
    with torch.cuda.device(query.device):
        codes = slot_codes(sketch, length) if sketch is not None else None
        return decode_attention(query, exact_keys, exact_values, exact_pos, sketch, part_map(exact_pos, key_valid),
                                codes, torch.full((1,), length, dtype=torch.long, device=query.device), length,
                                scaling)


def decode_attention(query, exact_keys, exact_values, exact_pos, sketch, part, codes, length, span, scaling,
                     order=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's attention over a store whose part map and bucket codes are built (the in-place step keeps
    them): :func:`attend_splits`'s arguments, and the positions' :func:`bucket_order` or None; the output
    ``(B, 1, Hq, D)`` and the mass ``(B, Hkv, span)`` fp32 (zeros from ``length`` on), on the current CUDA device."""
    splits = attend_splits(query, exact_keys, exact_values, exact_pos, sketch, part, codes, length, span, scaling)
    if splits.linear:
        position_pass(splits, order=order)
    mass = torch.empty(*exact_pos.shape[:2], span, dtype=torch.float32, device=query.device)
    combine_splits(splits, mass)
    return splits.output(), mass


def combine_splits(splits: DecodeSplits, mass: torch.Tensor | None = None) -> None:
    """Launch ``_combine`` on the current CUDA device: the splits merged into ``splits.out``, and each position's
    attention mass into ``mass`` ``(B, Hkv, span)`` fp32 when given."""
    span = splits.span
    side_stream.join(splits.out.device)  # the exact splits, under the linear combine
    _combine[(splits.batch * splits.kv_heads, triton.cdiv(span, BLOCK_MASS) if mass is not None else 1)](
        splits.logits, splits.acc, splits.max, splits.sum, splits.out, mass if mass is not None else splits.logits,
        splits.vague_share(), splits.vague_top if splits.linear else splits.logits, splits.length, span,
        splits.columns, splits.splits,
        G=splits.group, GP=splits.group_pad, D=splits.head_dim, DP=splits.head_dim_pad, SP=splits.columns_pad,
        SPA=splits.splits_pad, ROWS=splits.rows, LINEAR=splits.linear, WITH_MASS=mass is not None,
        BLOCK=BLOCK_MASS, CHAINED=splits.chained, num_warps=4, launch_pdl=splits.chained,
    )


@dataclass
class DecodeSplits:
    """The split-K pass's results (``_decode_split``), before they are combined: the output buffer to combine
    into ``(B, Hq, D)``, the logits ``(B, Hq, span)`` (the attended positions first), the partial max and sum of
    each of ``columns`` programs per query head ``(B, Hq, columns)`` and the partial outputs of the first
    ``splits`` ``(B, Hq, splits, D)`` (the others, the linear combine's Vague ranges, have none), and what the step
    read: the part map, the bucket codes and the length on the device.

    Under the linear combine (``sketch.combine == "mean"``) also the buckets' weights ``(B, Hq, slots)`` fp32, the
    sketch's values ``(B, Hkv, slots, D)`` and counts (None without the ``"mean"`` estimator), and the Vague share
    of the output ``(B, Hq, D)`` fp32: :func:`position_pass` sums the weights and multiplies them by the values
    into it, before a combine. And the Vague logits ``(B, span, Hq)`` fp32, position-major (-inf at other
    positions), which the weights are summed from, and each query head's highest Vague logit ``vague_top``
    ``(B, Hq)``, their reference. Then the exact splits run on the side stream, and the combine joins it.
    ``chained``: the chain's launches on the current stream are programmatic dependents (:data:`PDL`).
    """

    out: torch.Tensor
    logits: torch.Tensor
    acc: torch.Tensor
    max: torch.Tensor
    sum: torch.Tensor
    part: torch.Tensor
    codes: torch.Tensor | None
    length: torch.Tensor
    batch: int
    kv_heads: int
    group: int
    head_dim: int
    span: int
    splits: int
    columns: int
    rows: int = 1
    weights: torch.Tensor | None = None
    bucket_values: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    vague_out: torch.Tensor | None = None
    vague_logits: torch.Tensor | None = None
    vague_top: torch.Tensor | None = None
    chained: bool = False

    @property
    def linear(self) -> bool:
        return self.weights is not None

    @property
    def slots(self) -> int:
        """Buckets per KV head (all rows), 0 without the linear combine."""
        return self.weights.shape[-1] if self.linear else 0

    def vague_share(self) -> torch.Tensor:
        """``VAGUE_OUT`` of the combine kernels (a placeholder, never read, without the linear combine)."""
        return self.vague_out if self.linear else self.logits

    @property
    def group_pad(self) -> int:
        return tile_pad(self.group)

    @property
    def head_dim_pad(self) -> int:
        return tile_pad(self.head_dim)

    @property
    def splits_pad(self) -> int:
        return max(SPLITS_PER_READ, triton.next_power_of_2(self.splits))

    @property
    def columns_pad(self) -> int:
        return max(SPLITS_PER_READ, triton.next_power_of_2(self.columns))

    def output(self) -> torch.Tensor:
        """The combined output in transformers' layout ``(B, 1, Hq, D)`` (once a combine has run)."""
        return self.out.view(self.batch, 1, self.kv_heads * self.group, self.head_dim)


def attend_splits(query, exact_keys, exact_values, exact_pos, sketch, part, codes, length, span,
                  scaling, after_append: bool = False) -> DecodeSplits:
    """Launch the split-K pass over the compressed store, on the current CUDA device.

    Arguments as :func:`reviver_decode_triton`'s, with ``part`` the store's part map ``(B, Hkv, >= span)`` int8
    (rows of unit stride, only the first ``length`` positions read), ``codes`` the positions' bucket codes
    ``(B, r, >= span)`` int32 as :func:`slot_codes` writes them, or None to hash them for this step, ``length``
    the positions to attend, ``(1,)`` int64 on the device, and ``span >= length`` the positions the grid and the
    logits cover (host int). A step whose length only the device knows, as in a CUDA graph, can run this way.

    Under the sketch's linear combine, programs of ``_decode_split`` also take the query's logit of every bucket
    (``_bucket_logits``), and a second launch (``_vague_logits``) reads a Vague position's logit as the sum of its r
    buckets' logits. The exact splits then run on the side stream (``EXACT_BESIDE``), so whoever reads the splits'
    partial results before :func:`combine_splits` must join it first (:func:`position_pass` does, for the mass).

    Under the linear combine the chain after the bucket logits launches as programmatic dependents
    (:func:`chain_launches`). ``after_append``: the in-place step's append ran since the query, the sketch's keys
    and its counts were written (and nothing on this stream writes them since), so the bucket logits are a
    dependent too, of what ran last, and take their products before they wait.
    """
    b, hq, _, d = query.shape
    hkv, e = exact_keys.shape[1], exact_keys.shape[2]
    group = hq // hkv
    device = query.device
    q = query.reshape(b, hq, d)
    if q.stride(2) != 1:
        q = q.contiguous()
    exact_keys = exact_keys.to(query.dtype).contiguous()
    exact_values = exact_values.to(query.dtype).contiguous()
    exact_pos = exact_pos.to(torch.int32).contiguous()
    if part.stride(2) != 1 or part.stride(0) != hkv * part.stride(1):
        raise ValueError("the part map must be (B, Hkv, L) with rows of unit stride, laid out batch-major")
    gp = tile_pad(group)
    dp = tile_pad(d)

    has_sketch = sketch is not None
    linear = has_sketch and sketch.combine == "mean"
    bucket_logits = weights = counts = vague_out = vague_logits = vague_top = None
    if has_sketch:
        sk, sv = sketch.keys.to(query.dtype).contiguous(), sketch.values.to(query.dtype).contiguous()
        counts = sketch.counts.contiguous() if sketch.counts is not None else None
        buckets, width, rows = sketch.buckets.contiguous(), sketch.width, sketch.rows
        signed_keys = sketch.signed_keys
        # Hashed once for all KV heads: hashing inside the main loop, per head, made the kernel 1.6x slower.
        slots = codes if codes is not None else slot_codes(sketch, span)
        if linear:
            bucket_logits = torch.empty(b, rows * width, hq, dtype=torch.float32, device=device)  # slot-major
            weights = torch.empty(b, hq, rows * width, dtype=torch.float32, device=device)  # zeroed by _bucket_logits,
            vague_out = torch.empty(b, hq, d, dtype=torch.float32, device=device)  # as is this; vague_top is -inf
            vague_logits = torch.empty(b, span, hq, dtype=torch.float32, device=device)  # position-major
            vague_top = torch.empty(b, hq, dtype=torch.float32, device=device)
    else:
        sk, sv, slots = exact_keys, exact_values, exact_pos  # not read without a sketch
        buckets = torch.zeros(b, dtype=torch.long, device=device)
        width, rows, signed_keys = 1, 1, False

    block_v = BLOCK_LINEAR if linear else BLOCK_VAGUE
    exact_blocks = triton.cdiv(max(e, 1), BLOCK_EXACT)
    bucket_blocks = triton.cdiv(rows * width, BLOCK_BUCKETS) if linear else 0
    if linear:  # the splits attend the exact slots, and vague_rows x splits ranges of positions are Vague programs
        splits = _split_plan(math.isqrt(SPLIT_BALANCE * exact_blocks - 1) + 1, b * hkv, PROGRAMS_PER_SM_LINEAR, device)
        vague_range = max(MIN_VAGUE_RANGE, triton.cdiv(span, VAGUE_RANGES))
        vague_rows = triton.cdiv(triton.cdiv(span, vague_range), splits)
        pos_per_split = triton.cdiv(triton.cdiv(span, vague_rows * splits), block_v) * block_v
    else:
        splits = _split_plan(max(triton.cdiv(span, block_v), exact_blocks), b * hkv, PROGRAMS_PER_SM, device)
        vague_rows = 0
        pos_per_split = triton.cdiv(triton.cdiv(span, splits), block_v) * block_v
    slots_per_split = triton.cdiv(exact_blocks, splits) * BLOCK_EXACT
    columns = splits * (1 + vague_rows)

    logits = torch.empty(b, hq, span, dtype=torch.float32, device=device)
    part_acc = torch.empty(b, hq, splits, d, dtype=torch.float32, device=device)
    part_m = torch.empty(b, hq, columns, dtype=torch.float32, device=device)
    part_l = torch.empty(b, hq, columns, dtype=torch.float32, device=device)
    placeholder = logits  # pointers a launch does not read in its mode
    chained = linear and EXACT_BESIDE and chain_launches(device)
    # A copy made here would be written by the launch the bucket logits depend on, and read before their wait.
    buckets_dependent = (chained and after_append and q.data_ptr() == query.data_ptr()
                         and sk.data_ptr() == sketch.keys.data_ptr()
                         and (counts is None or counts.data_ptr() == sketch.counts.data_ptr()))

    def launch_split(first_program: int, programs: int, dependent: bool = False, warps: int = NUM_WARPS) -> None:
        _decode_split[(b * hkv, programs)](
            q, q.stride(0), q.stride(1),
            exact_keys, exact_values, exact_pos, part, part.stride(1),
            sk, sv, counts if counts is not None else exact_pos, buckets, slots, slots.stride(1) if has_sketch else 0,
            bucket_logits if linear else placeholder, weights if linear else placeholder,
            vague_out if linear else placeholder, vague_top if linear else placeholder,
            logits, part_acc, part_m, part_l, length,
            float(scaling), float(scaling) / rows, hkv, e, span, width, slots_per_split, pos_per_split, columns,
            splits, first_program,
            G=group, GP=gp, VP=gp if has_sketch else triton.next_power_of_2(group), D=d, DP=dp,
            ROWS=rows, HAS_SKETCH=has_sketch, MEAN=counts is not None,
            SIGNED_KEYS=signed_keys, LINEAR=linear, SKIP_EMPTY=SKIP_EMPTY, BLOCK_E=BLOCK_EXACT,
            BLOCK_V=block_v, BLOCK_B=BLOCK_BUCKETS, CHAINED=dependent, num_warps=warps,
            num_stages=NUM_STAGES_LINEAR if linear else NUM_STAGES, launch_pdl=dependent,
        )

    if not linear:
        launch_split(0, splits)
    elif EXACT_BESIDE:
        # The exact splits and the Vague chain (bucket logits, Vague logits, bucket sums and values) need nothing
        # of each other before the combine, which joins the side stream: they run at the same time.
        side_stream.launch_beside(device, lambda: launch_split(0, splits, warps=EXACT_WARPS),
                                  keep=(q, exact_keys, exact_values, exact_pos, part, logits, part_acc, part_m, part_l,
                                        length))
        launch_split(splits, bucket_blocks, dependent=buckets_dependent)
    else:
        launch_split(0, splits + bucket_blocks)
    if linear:
        heads_per_range = min(VAGUE_HEADS, triton.next_power_of_2(hq))
        head_groups = triton.cdiv(hq, heads_per_range)
        _vague_logits[(b * head_groups * vague_rows, splits)](
            bucket_logits, part, part.stride(1), slots, slots.stride(1), logits, vague_logits, part_m, part_l,
            vague_top, buckets, length, hkv, span, width, pos_per_split, columns, vague_rows, head_groups,
            G=group, ROWS=rows, SIGNED_KEYS=signed_keys, HB=heads_per_range, BLOCK=block_v, CHAINED=chained,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES_LINEAR, launch_pdl=chained,
        )

    out = torch.empty(b, hq, d, dtype=query.dtype, device=device)
    return DecodeSplits(out, logits, part_acc, part_m, part_l, part, slots if has_sketch else None, length, b, hkv,
                        group, d, span, splits, columns, rows, weights, sv if linear else None,
                        counts if linear else None, vague_out, vague_logits, vague_top, chained)


def position_pass(step: DecodeSplits | None, scores: torch.Tensor | None = None, mass: torch.Tensor | None = None,
                  part: torch.Tensor | None = None, codes: torch.Tensor | None = None,
                  length: torch.Tensor | None = None,
                  order: BucketOrder | None = None,
                  tops: tuple[torch.Tensor, torch.Tensor] | None = None,
                  bucket_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Launch ``_position_pass`` on the current CUDA device: the linear combine's bucket weights from the decode's
    logits (``step``), then ``_bucket_values``, their product with the buckets' values; and with ``scores``
    ``(B, Hkv, capacity)`` their update by the step's mass and each chunk's highest Vague score. The mass comes
    from ``step``'s logits, or from ``mass`` ``(B, Hkv, N)`` when ``step`` is None (then ``part``, ``codes`` and
    ``length`` say what the store holds). ``order``: the :func:`bucket_order` of the first positions, which the
    weights are summed through (the later positions, or all without it, one by one). ``tops``: where to write
    the chunks' highest scores (new buffers when None). ``bucket_weights=False``: the scores only, whatever the
    combine (the in-place step sums the weights first, in a launch without ``scores``, and the scores beside).

    Returns:
        with ``scores``, each chunk's highest Vague score ``(B * Hkv, chunks)`` fp32 and its position (int32,
        -1 for a chunk without Vague token); else None.
    """
    if step is not None:
        part, codes, length = step.part, step.codes, step.length
    b, hkv = part.shape[:2]
    span = scores.shape[-1] if scores is not None else step.span
    chunks = triton.cdiv(span, CHUNK_POSITIONS)
    device = part.device
    chunk_top = chunk_pos = None
    if scores is not None:
        chunk_top, chunk_pos = tops if tops is not None else chunk_tops(b * hkv, span, device)
    placeholder = part  # pointers the pass does not read in this mode
    from_logits = step is not None
    if from_logits and scores is not None:
        side_stream.join(device)  # the mass is over every split, the exact ones included
    linear = from_logits and step.linear and bucket_weights
    weights = step.weights if linear else placeholder
    # Without an order its launch reads none of it, but compiles the run sums: int32 pointers, as the order's.
    order_positions, order_codes, runs = order if order is not None else (codes if linear else placeholder,) * 3
    sorted_n = order_positions.shape[-1] if order is not None and linear else 0
    heads_pad = triton.next_power_of_2(hkv * step.group) if linear else 1
    piece = run_piece(heads_pad)
    width = runs.shape[-1] - 1 if sorted_n else 1
    pieces = max(1, triton.cdiv(sorted_n, width * piece))  # a mean run's pieces
    run_programs = triton.cdiv(b * step.slots * pieces, chunks) if sorted_n else 0
    dependent = from_logits and step.chained and scores is None  # on the chain's stream (the scores: beside it)
    _position_pass[(b * hkv + run_programs, chunks)](
        step.logits if from_logits else placeholder, step.vague_logits if linear else placeholder,
        step.max if from_logits else placeholder,
        step.sum if from_logits else placeholder, step.vague_top if linear else placeholder,
        mass if mass is not None else placeholder, part,
        codes if codes is not None else placeholder, order_positions, order_codes, runs, weights,
        scores if scores is not None else placeholder,
        chunk_top if chunk_top is not None else placeholder, chunk_pos if chunk_pos is not None else placeholder,
        length, b, hkv, step.span if from_logits else 0, part.stride(1), mass.stride(1) if mass is not None else 0,
        codes.stride(1) if codes is not None else 0, sorted_n, step.slots if linear else 0, width, pieces,
        step.columns if from_logits else 1, chunks,
        G=step.group if from_logits else 1, GP=triton.next_power_of_2(step.group) if from_logits else 1,
        HP=heads_pad, SP=step.columns_pad if from_logits else 1, ROWS=codes.shape[1] if codes is not None else 1,
        FROM_LOGITS=from_logits, LINEAR=linear, SCORE=scores is not None,
        CHUNK=CHUNK_POSITIONS, BLOCK=BLOCK_PASS, PIECE=piece, CHAINED=dependent,
        num_warps=PASS_WARPS, launch_pdl=dependent,
    )
    if linear:
        _bucket_values[(b * hkv, triton.cdiv(step.slots, BLOCK_BUCKETS))](
            step.weights, step.bucket_values, step.counts if step.counts is not None else step.weights,
            step.vague_out, hkv, step.slots, G=step.group, GP=step.group_pad, D=step.head_dim,
            DP=step.head_dim_pad, MEAN=step.counts is not None, BLOCK=BLOCK_BUCKETS, CHAINED=step.chained,
            num_warps=4, launch_pdl=step.chained,
        )
    return None if scores is None else (chunk_top, chunk_pos)
