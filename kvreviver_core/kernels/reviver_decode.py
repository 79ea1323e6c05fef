"""Fused KVReviver decode attention in Triton: split-K flash-decoding over the exact slots and the Vague sketch.

One decode step (one query per sequence) reads only the compressed store:

* the exact slots (Recent + Candidate) ``(B, Hkv, E, D)`` and their positions;
* the Vague tokens, rebuilt on the fly inside the kernel from the sketch's ``r x b`` bucket rows: the position's
  buckets and signs are those of :meth:`kvreviver_core.sketch.VagueSketch.slots`, the key is the median of the r
  bucket keys (signed too with ``signed_keys``) and the value the median of the signed bucket values (divided by
  the bucket counts for ``"mean"``).

HBM traffic is the exact store, the sketch, a byte per position and KV head for the part map and the fp32 logits of
the query heads, so it follows the budget, not the context. The full K/V are never materialised. But every Vague
token gathers 2r bucket vectors (3 keys, 3 values), which the L2 cache serves: at the paper's split (90% of the
tokens Vague at a 10% budget) that is about 2.8x the full cache's K/V bytes through L2, and on an H200 the kernel is
slower than SDPA over the full cache; with only exact tokens it is faster (see BENCHMARKS.md, issue 7).

The part map ``(B, Hkv, L)`` int8 says what each position is for each KV head: ``MASKED`` (padding), ``VAGUE`` or
``EXACT`` (a sequence without sketch buckets attends its exact tokens only). A layer on the in-place decode path
(:mod:`.inplace_step`) keeps the part map and the positions' bucket codes up to date between steps; otherwise they
are built for the step:

0. ``_slot_map``: every position's r bucket slots and signs, ``(B, r, L)`` int32, hashed once for all KV heads;
1. the part map's copy and ``_mark_exact``.

Then the attention itself, two launches:

* ``_decode_split``: grid ``(B * Hkv, splits)``. Each program owns one KV head (all G query heads of its group,
   so keys are loaded once for the group) and one slice of the exact slots and of the positions. It runs an online
   softmax and writes its partial output, max and sum, plus the raw logit of every position it owns;
* ``_combine``: merges the splits into the output and turns the logits into each position's attention mass,
  summed over the group's query heads, reading the logits (4 bytes a head and position), never the K/V. The
  in-place step's compress kernel does this itself (:mod:`.inplace_step`), adding the mass straight to the scores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvreviver_core.kernels.reference import check_decode_inputs
from kvreviver_core.sketch import _MIX_1, _MIX_2, VagueSketch, _wrap64

# The hash of VagueSketch.slots: x = pos * POS_MUL + row_terms[row], then _mix(x) (row_terms: the sketch's).
_POS_MUL = tl.constexpr(0x9E3779B1)
_M1 = tl.constexpr(_wrap64(_MIX_1))
_M2 = tl.constexpr(_wrap64(_MIX_2))

SUPPORTED_ROWS = (1, 3)  # median of 1 or 3 rows; other row counts use the reference
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_EXACT = 64  # exact slots per loop step
BLOCK_VAGUE = 32  # positions per loop step (3 gathered rows each for keys and values)
BLOCK_MASS = 1024  # positions per program in the combine kernel
MAX_SPLITS = 128
PROGRAMS_PER_SM = 8  # split-K target: programs of the main kernel per multiprocessor
NUM_WARPS = 4
NUM_STAGES = 2  # software pipelining depth of the main kernel's loops (Triton's default on NVIDIA: 3)
SKIP_EMPTY = False  # skip the sketch gathers of position blocks without a Vague token (a branch in the loop)
BLOCK_SLOTS = 1024  # positions per program of _slot_map
MASKED, VAGUE, EXACT = 0, 1, 2  # the part map's codes
_VAGUE = tl.constexpr(VAGUE)
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
def _online_softmax(m, l, acc, s, v):
    """Fold logits ``s`` (GP, BLOCK) and values ``v`` (BLOCK, DP) into the running max, sum and output."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_use)
    p = tl.exp(s - m_use[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l, acc


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


@triton.jit(do_not_specialize=["span", "slots_per_split", "pos_per_split"])
def _decode_split(
    Q, stride_qb, stride_qh,
    EK, EV, EPOS, PART, part_stride,
    SK, SV, SCNT, BUCKETS, SLOTS, code_stride,
    LOGITS, PART_ACC, PART_M, PART_L, LENGTH,
    scaling, Hkv, E, span, width, slots_per_split, pos_per_split,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, ROWS: tl.constexpr,
    HAS_SKETCH: tl.constexpr, MEAN: tl.constexpr, SIGNED_KEYS: tl.constexpr, SKIP_EMPTY: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
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
    L = tl.load(LENGTH).to(tl.int32)  # positions to attend; the grid covers span >= L of them
    logit_rows = LOGITS + (b.to(tl.int64) * Hkv * G + qh)[:, None] * span  # (GP, 1) row starts
    part_row = PART + bh64 * part_stride

    m = tl.full((GP,), float("-inf"), tl.float32)
    l = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DP), tl.float32)

    # Exact slots (Recent + Candidate): one contiguous slice of the slots.
    for start in range(0, slots_per_split, BLOCK_E):
        slots = split * slots_per_split + start + tl.arange(0, BLOCK_E)
        pos = tl.load(EPOS + bh64 * E + slots, mask=slots < E, other=-1)
        ok = (pos >= 0) & (tl.load(part_row + pos, mask=pos >= 0, other=0) == _EXACT)
        offs = (bh64 * E + slots)[:, None] * D + di[None, :]
        lmask = ok[:, None] & dmask[None, :]
        k = tl.load(EK + offs, mask=lmask, other=0.0, eviction_policy="evict_first")
        v = tl.load(EV + offs, mask=lmask, other=0.0, eviction_policy="evict_first")
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
        s = tl.where(ok[None, :], s, float("-inf"))
        tl.store(logit_rows + pos[None, :], s, mask=gmask[:, None] & (pos >= 0)[None, :])
        m, l, acc = _online_softmax(m, l, acc, s, v)

    # Every position not held exactly: Vague (rebuilt from the sketch) or masked. Each is written exactly once.
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
        s = tl.full((GP, BLOCK_V), float("-inf"), tl.float32)
        if HAS_SKETCH:
            if SKIP_EMPTY:
                if tl.max(vague.to(tl.int32), 0) > 0:
                    s, m, l, acc = _vague_block(q, m, l, acc, p, vague, slot_rows, code_stride,
                                                head_keys, head_values, head_counts, di, dmask, scaling, D, ROWS,
                                                MEAN, SIGNED_KEYS)
            else:
                s, m, l, acc = _vague_block(q, m, l, acc, p, vague, slot_rows, code_stride,
                                            head_keys, head_values, head_counts, di, dmask, scaling, D, ROWS,
                                            MEAN, SIGNED_KEYS)
        tl.store(logit_rows + p[None, :], s, mask=gmask[:, None] & free[None, :])

    part = (bh64 * G + gi) * splits + split  # (GP,) rows of PART_M / PART_L
    tl.store(PART_M + part, m, mask=gmask)
    tl.store(PART_L + part, l, mask=gmask)
    tl.store(PART_ACC + part[:, None] * D + di[None, :], acc, mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _split_totals(PART_M, PART_L, rows, gmask, splits, SP: tl.constexpr):
    """The query heads' overall max and 1 / softmax denominator over the splits' partial results."""
    si = tl.arange(0, SP)
    pmask = gmask[:, None] & (si < splits)[None, :]
    part_m = tl.load(PART_M + rows[:, None] * splits + si[None, :], mask=pmask, other=float("-inf"))
    part_l = tl.load(PART_L + rows[:, None] * splits + si[None, :], mask=pmask, other=0.0)
    top = tl.max(part_m, 1)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(part_l * tl.exp(part_m - top[:, None]), 1)
    inv = tl.where(total > 0, 1.0 / total, 0.0)  # a query with nothing to attend gets 0, as the reference does
    return top, inv


@triton.jit
def _combine_output(PART_ACC, PART_M, OUT, rows, gmask, top, inv, splits, GP: tl.constexpr, D: tl.constexpr,
                    DP: tl.constexpr):
    """Merge the splits' partial outputs into the attention output of the query heads ``rows``."""
    di = tl.arange(0, DP)
    dmask = di < D
    out = tl.zeros((GP, DP), tl.float32)
    for s in range(0, splits):
        weight = tl.exp(tl.load(PART_M + rows * splits + s, mask=gmask, other=float("-inf")) - top)
        part = tl.load(PART_ACC + (rows * splits + s)[:, None] * D + di[None, :],
                       mask=gmask[:, None] & dmask[None, :], other=0.0)
        out += part * weight[:, None]
    out = out * inv[:, None]
    tl.store(OUT + rows[:, None] * D + di[None, :], out.to(OUT.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _position_mass(LOGITS, rows, gmask, p, inside, top, inv, L):
    """Each position's attention probability summed over the query heads ``rows``."""
    logits = tl.load(LOGITS + rows[:, None] * L + p[None, :], mask=gmask[:, None] & inside[None, :], other=float("-inf"))
    return tl.sum(tl.exp(logits - top[:, None]) * inv[:, None], 0)


@triton.jit(do_not_specialize=["L"])
def _combine(
    LOGITS, PART_ACC, PART_M, PART_L, OUT, MASS, L, splits,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    gi = tl.arange(0, GP)
    gmask = gi < G
    rows = bh * G + gi  # query heads of this KV group
    top, inv = _split_totals(PART_M, PART_L, rows, gmask, splits, SP)
    if blk == 0:
        _combine_output(PART_ACC, PART_M, OUT, rows, gmask, top, inv, splits, GP, D, DP)
    p = blk * BLOCK + tl.arange(0, BLOCK)
    inside = p < L
    tl.store(MASS + bh * L + p, _position_mass(LOGITS, rows, gmask, p, inside, top, inv, L), mask=inside)


def kernel_unsupported(query: torch.Tensor, sketch: VagueSketch | None) -> str | None:
    """Why the Triton kernel cannot run these inputs (then use the reference), or None when it can."""
    if query.device.type != "cuda":
        return "the Triton kernel runs on CUDA only"
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} is not supported by the kernel"
    if sketch is not None and sketch.width == 0:
        return "no sequence of the batch has sketch buckets (the kernel is written for a non-empty sketch)"
    if sketch is not None and sketch.rows not in SUPPORTED_ROWS:
        return f"the kernel takes the median of {' or '.join(map(str, SUPPORTED_ROWS))} sketch rows, not {sketch.rows}"
    return None


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_plan(work_items: int, programs: int, device: torch.device) -> int:
    """Splits per KV head: PROGRAMS_PER_SM programs per multiprocessor, never more than there are blocks of work."""
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(MAX_SPLITS, triton.cdiv(PROGRAMS_PER_SM * sms, programs), work_items))


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
        splits = attend_splits(query, exact_keys, exact_values, exact_pos, sketch, part_map(exact_pos, key_valid),
                               None, torch.full((1,), length, dtype=torch.long, device=query.device), length,
                               scaling)
        mass = torch.empty(*exact_pos.shape[:2], length, dtype=torch.float32, device=query.device)
        _combine[(splits.batch * splits.kv_heads, triton.cdiv(length, BLOCK_MASS))](
            splits.logits, splits.acc, splits.max, splits.sum, splits.out, mass, length, splits.splits,
            G=splits.group, GP=splits.group_pad, D=splits.head_dim, DP=splits.head_dim_pad, SP=splits.splits_pad,
            BLOCK=BLOCK_MASS, num_warps=4,
        )
        return splits.output(), mass


@dataclass
class DecodeSplits:
    """The split-K pass's results (``_decode_split``), before they are combined: the output buffer to combine
    into ``(B, Hq, D)``, the logits ``(B, Hq, span)`` (the attended positions first) and each split's partial
    output, max and sum."""

    out: torch.Tensor
    logits: torch.Tensor
    acc: torch.Tensor
    max: torch.Tensor
    sum: torch.Tensor
    batch: int
    kv_heads: int
    group: int
    head_dim: int
    span: int
    splits: int

    @property
    def group_pad(self) -> int:
        return max(16, triton.next_power_of_2(self.group))

    @property
    def head_dim_pad(self) -> int:
        return max(16, triton.next_power_of_2(self.head_dim))

    @property
    def splits_pad(self) -> int:
        return triton.next_power_of_2(self.splits)

    def output(self) -> torch.Tensor:
        """The combined output in transformers' layout ``(B, 1, Hq, D)`` (once a combine has run)."""
        return self.out.view(self.batch, 1, self.kv_heads * self.group, self.head_dim)


def attend_splits(query, exact_keys, exact_values, exact_pos, sketch, part, codes, length, span,
                  scaling) -> DecodeSplits:
    """Launch the split-K pass over the compressed store, on the current CUDA device.

    Arguments as :func:`reviver_decode_triton`'s, with ``part`` the store's part map ``(B, Hkv, >= span)`` int8
    (rows of unit stride, only the first ``length`` positions read), ``codes`` the positions' bucket codes
    ``(B, r, >= span)`` int32 as :func:`slot_codes` writes them, or None to hash them for this step, ``length``
    the positions to attend, ``(1,)`` int64 on the device, and ``span >= length`` the positions the grid and the
    logits cover (host int). A step whose length only the device knows, as in a CUDA graph, can run this way.
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

    has_sketch = sketch is not None
    if has_sketch:
        sk, sv = sketch.keys.to(query.dtype).contiguous(), sketch.values.to(query.dtype).contiguous()
        counts = sketch.counts.contiguous() if sketch.counts is not None else exact_pos
        buckets, width, rows = sketch.buckets.contiguous(), sketch.width, sketch.rows
        mean, signed_keys = sketch.counts is not None, sketch.signed_keys
        # Hashed once for all KV heads: hashing inside the main loop, per head, made the kernel 1.6x slower.
        slots = codes if codes is not None else slot_codes(sketch, span)
    else:
        sk, sv, counts, slots = exact_keys, exact_values, exact_pos, exact_pos  # not read without a sketch
        buckets = torch.zeros(b, dtype=torch.long, device=device)
        width, rows, mean, signed_keys = 1, 1, False, False

    splits = _split_plan(max(triton.cdiv(span, BLOCK_VAGUE), triton.cdiv(max(e, 1), BLOCK_EXACT)), b * hkv, device)
    slots_per_split = triton.cdiv(triton.cdiv(max(e, 1), splits), BLOCK_EXACT) * BLOCK_EXACT
    pos_per_split = triton.cdiv(triton.cdiv(span, splits), BLOCK_VAGUE) * BLOCK_VAGUE
    gp = max(16, triton.next_power_of_2(group))
    dp = max(16, triton.next_power_of_2(d))

    logits = torch.empty(b, hq, span, dtype=torch.float32, device=device)
    part_acc = torch.empty(b, hq, splits, d, dtype=torch.float32, device=device)
    part_m = torch.empty(b, hq, splits, dtype=torch.float32, device=device)
    part_l = torch.empty(b, hq, splits, dtype=torch.float32, device=device)
    _decode_split[(b * hkv, splits)](
        q, q.stride(0), q.stride(1),
        exact_keys, exact_values, exact_pos, part, part.stride(1),
        sk, sv, counts, buckets, slots, slots.stride(1) if has_sketch else 0,
        logits, part_acc, part_m, part_l, length,
        float(scaling), hkv, e, span, width, slots_per_split, pos_per_split,
        G=group, GP=gp, D=d, DP=dp, ROWS=rows, HAS_SKETCH=has_sketch, MEAN=mean, SIGNED_KEYS=signed_keys,
        SKIP_EMPTY=SKIP_EMPTY, BLOCK_E=BLOCK_EXACT, BLOCK_V=BLOCK_VAGUE, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )

    out = torch.empty(b, hq, d, dtype=query.dtype, device=device)
    return DecodeSplits(out, logits, part_acc, part_m, part_l, b, hkv, group, d, span, splits)
