"""The compress step of a decode on the Triton path: the swap test's count and the swap/fold, one launch each.

After each decode attention a KVReviver layer (:mod:`kvreviver_core.methods.reviver`) adds the step's attention mass
to its cumulative scores and runs Algorithm 3. In torch, the swap test is 15 ops and a swap 60 (a fold 40), each a
kernel launch, and a decode step is host-bound on launches (BENCHMARKS.md, issue 7). Two kernels take them over:

* :func:`swap_test_triton` adds the mass to the scores and counts, per sequence and KV head, the Vague tokens whose
  score beats the lowest Candidate's x ReplaceRate, with the Candidate and Vague scores that pair them. At most
  steps the count is 0 everywhere and the step ends there.
* :func:`sketch_trade_triton` moves tokens across the boundary in pairs ``(slot, pos)``:

  * a **swap** (``vague_pos`` given): the Vague token at ``pos`` is read from the sketch (its estimate: the median
    of its r buckets), that estimate is deleted from the sketch, the Candidate in exact slot ``slot`` is inserted,
    and the slot takes the estimate and the position ``pos``;
  * a **fold** (no ``vague_pos``): the token in exact slot ``slot`` is inserted and the slot is emptied (-1).

  One program per (sequence, KV head) applies its pairs one after another, so buckets that several pairs hit are
  updated in a fixed order, without atomics: the result is the same on every run. All estimates are read before
  any bucket changes, as :meth:`~kvreviver_core.sketch.VagueSketch.swap` reads them. Each update of a bucket is
  rounded to the storage dtype on its own, where torch sums a slot's updates in fp32 and rounds once, so bf16
  buckets that several updates hit may differ in their last bits.

Both give what the torch path gives (tests/test_kernel.py, on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvreviver_core.kernels.reviver_decode import _bucket, _median_rows
from kvreviver_core.sketch import VagueSketch

PAIRS_PER_BLOCK = 16  # returning tokens whose estimates are read in one vectorised step
BLOCK_POSITIONS = 1024  # positions per loop step of the swap count
BLOCK_SLOTS = 256  # exact slots per loop step of the swap count


@triton.jit
def _swap_test(SCORES, MASS, EPOS, RECENT_START, OFFSETS, SWAPPING, COUNT, CANDIDATE, VAGUE, H, N, E, replace_rate,
               BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    scores, mass, slots = SCORES + bh * N, MASS + bh * N, EPOS + bh * E
    candidate_row, vague_row = CANDIDATE + bh * E, VAGUE + bh * N
    for start in range(0, N, BLOCK_N):
        p = start + tl.arange(0, BLOCK_N)
        tl.store(scores + p, tl.load(scores + p, mask=p < N) + tl.load(mass + p, mask=p < N), mask=p < N)
    tl.debug_barrier()  # the loops below read scores other threads of this program wrote

    recent_start = tl.load(RECENT_START + b)
    lowest = tl.full((BLOCK_E,), float("inf"), tl.float32)
    for start in range(0, E, BLOCK_E):
        slot = start + tl.arange(0, BLOCK_E)
        pos = tl.load(slots + slot, mask=slot < E, other=-1)
        candidate = (pos >= 0) & (pos < recent_start)
        score = tl.load(scores + pos, mask=candidate, other=float("inf"))
        tl.store(candidate_row + slot, score, mask=slot < E)
        lowest = tl.minimum(lowest, score)
    bar = tl.min(lowest, 0) * replace_rate

    # Vague = every position past the padding, less the exact ones: count both and subtract.
    offset = tl.load(OFFSETS + b)
    swapping = tl.load(SWAPPING + b) != 0
    above = tl.zeros((BLOCK_N,), tl.int32)
    for start in range(0, N, BLOCK_N):
        p = start + tl.arange(0, BLOCK_N)
        score = tl.load(scores + p, mask=(p < N) & (p >= offset) & swapping, other=float("-inf"))
        tl.store(vague_row + p, score, mask=p < N)
        above += (score > bar).to(tl.int32)
    tl.debug_barrier()  # the exact positions' -inf below overwrite what other threads stored
    held = tl.zeros((BLOCK_E,), tl.int32)
    for start in range(0, E, BLOCK_E):
        slot = start + tl.arange(0, BLOCK_E)
        pos = tl.load(slots + slot, mask=slot < E, other=-1)
        held += (tl.load(vague_row + pos, mask=pos >= 0, other=float("-inf")) > bar).to(tl.int32)
        tl.store(vague_row + pos, tl.full((BLOCK_E,), float("-inf"), tl.float32), mask=pos >= 0)
    tl.store(COUNT + bh, tl.sum(above, 0) - tl.sum(held, 0))


def swap_test_triton(scores: torch.Tensor, mass: torch.Tensor, exact_pos: torch.Tensor, recent_start: torch.Tensor,
                     offsets: torch.Tensor, swapping: torch.Tensor, replace_rate: float,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add ``mass`` to ``scores`` in place, then the swap test's inputs, as ``ReviverLayer._swap_test`` builds them.

    Args:
        scores: ``(B, H, N)`` fp32 cumulative scores, contiguous; mass: ``(B, H, N)`` fp32, this step's.
        exact_pos: ``(B, H, E)`` int32 (-1 = empty); positions below ``recent_start`` ``(B,)`` are Candidates.
        offsets: ``(B,)`` left padding (never Vague); swapping: ``(B,)`` bool, the rows that may swap at all.
        replace_rate: the bar is the lowest Candidate score times this.

    Returns:
        the number of Vague tokens above the bar ``(B, H)`` int32, the Candidates' scores ``(B, H, E)`` (+inf in
        other slots) and the Vague tokens' scores ``(B, H, N)`` (-inf at exact and padding positions and in rows
        that do not swap).
    """
    b, h, n = scores.shape
    e = exact_pos.shape[-1]
    if not scores.is_contiguous():
        raise ValueError("swap_test_triton adds to the scores in place: they must be contiguous")
    count = torch.empty(b, h, dtype=torch.int32, device=scores.device)
    candidate_scores = torch.empty(b, h, e, dtype=torch.float32, device=scores.device)
    vague_scores = torch.empty(b, h, n, dtype=torch.float32, device=scores.device)
    with torch.cuda.device(scores.device):
        _swap_test[(b * h,)](
            scores, mass.contiguous(), exact_pos.contiguous(), recent_start.reshape(b).contiguous(),
            offsets.contiguous(), swapping.reshape(b).contiguous().view(torch.int8), count, candidate_scores,
            vague_scores, h, n, e, float(replace_rate), BLOCK_N=BLOCK_POSITIONS, BLOCK_E=BLOCK_SLOTS,
        )
    return count, candidate_scores, vague_scores


@triton.jit
def _add_token(HEAD_KEYS, HEAD_VALUES, HEAD_COUNTS, logical, key, value, nb, width, ROW_TERMS, di, dmask,
               WEIGHT: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, MEAN: tl.constexpr,
               SIGNED_KEYS: tl.constexpr):
    """Add ``WEIGHT`` (+1 insert, -1 delete) x one token's key, signed value and count to its bucket in each row."""
    for row in tl.static_range(ROWS):
        slot, sign = _bucket(logical, nb, width, ROW_TERMS, row)
        signed = (sign * WEIGHT).to(tl.float32)
        offs = slot * D + di
        if SIGNED_KEYS:
            k = tl.load(HEAD_KEYS + offs, mask=dmask).to(tl.float32) + key.to(tl.float32) * signed
        else:
            k = tl.load(HEAD_KEYS + offs, mask=dmask).to(tl.float32) + key.to(tl.float32) * WEIGHT
        tl.store(HEAD_KEYS + offs, k.to(HEAD_KEYS.dtype.element_ty), mask=dmask)
        v = tl.load(HEAD_VALUES + offs, mask=dmask).to(tl.float32) + value.to(tl.float32) * signed
        tl.store(HEAD_VALUES + offs, v.to(HEAD_VALUES.dtype.element_ty), mask=dmask)
        if MEAN:
            tl.store(HEAD_COUNTS + slot, tl.load(HEAD_COUNTS + slot) + WEIGHT)


@triton.jit
def _trade(
    EK, EV, EPOS, SK, SV, SCNT, BUCKETS, OFFSETS, ROW_TERMS,
    SLOT, VPOS, MOVE, EST_K, EST_V,
    H, E, M, width,
    D: tl.constexpr, DP: tl.constexpr, ROWS: tl.constexpr, MEAN: tl.constexpr, SIGNED_KEYS: tl.constexpr,
    SWAP: tl.constexpr, BLOCK_P: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    di = tl.arange(0, DP)
    dmask = di < D
    has_buckets = tl.load(BUCKETS + b) > 0
    nb = tl.maximum(tl.load(BUCKETS + b), 1)
    offset = tl.load(OFFSETS + b)
    sbase = bh * (ROWS * width)  # this KV head's first bucket
    head_keys, head_values, head_counts = SK + sbase * D, SV + sbase * D, SCNT + sbase
    pairs = bh * M

    if SWAP:
        for start in range(0, M, BLOCK_P):
            pi = start + tl.arange(0, BLOCK_P)
            moving = (pi < M) & (tl.load(MOVE + pairs + pi, mask=pi < M, other=0) != 0)
            logical = tl.load(VPOS + pairs + pi, mask=moving, other=0) - offset
            slot0, sign0 = _bucket(logical, nb, width, ROW_TERMS, 0)
            slot1, sign1 = slot0, sign0
            slot2, sign2 = slot0, sign0
            if ROWS == 3:
                slot1, sign1 = _bucket(logical, nb, width, ROW_TERMS, 1)
                slot2, sign2 = _bucket(logical, nb, width, ROW_TERMS, 2)
            # The median picks one of the stored values, so the estimate is exact in the storage dtype.
            est_k = _median_rows(head_keys, head_counts, slot0, slot1, slot2, sign0, sign1, sign2, moving, di, dmask,
                                 D, ROWS, MEAN, SIGNED_KEYS)
            est_v = _median_rows(head_values, head_counts, slot0, slot1, slot2, sign0, sign1, sign2, moving, di,
                                 dmask, D, ROWS, MEAN, True)
            offs = (pairs + pi)[:, None] * D + di[None, :]
            both = moving[:, None] & dmask[None, :]
            tl.store(EST_K + offs, est_k.to(EST_K.dtype.element_ty), mask=both)
            tl.store(EST_V + offs, est_v.to(EST_V.dtype.element_ty), mask=both)
        tl.debug_barrier()

    for i in range(0, M):
        if tl.load(MOVE + pairs + i) != 0:
            slot = tl.load(SLOT + pairs + i)
            entry = (bh * E + slot) * D + di
            leaving_k = tl.load(EK + entry, mask=dmask)
            leaving_v = tl.load(EV + entry, mask=dmask)
            leaving_pos = tl.load(EPOS + bh * E + slot).to(tl.int64)
            if SWAP:
                est_k = tl.load(EST_K + (pairs + i) * D + di, mask=dmask)
                est_v = tl.load(EST_V + (pairs + i) * D + di, mask=dmask)
                returning = tl.load(VPOS + pairs + i)
                _add_token(head_keys, head_values, head_counts, returning - offset, est_k, est_v, nb, width,
                           ROW_TERMS, di, dmask, -1, D, ROWS, MEAN, SIGNED_KEYS)
                tl.debug_barrier()  # the insert below may hit the same buckets
                tl.store(EK + entry, est_k, mask=dmask)
                tl.store(EV + entry, est_v, mask=dmask)
                tl.store(EPOS + bh * E + slot, returning.to(tl.int32))
            else:
                tl.store(EPOS + bh * E + slot, -1)
            if has_buckets:  # a row without buckets drops what it folds
                _add_token(head_keys, head_values, head_counts, leaving_pos - offset, leaving_k, leaving_v, nb,
                           width, ROW_TERMS, di, dmask, 1, D, ROWS, MEAN, SIGNED_KEYS)
            tl.debug_barrier()  # the next pair reads what this one wrote


def sketch_trade_triton(
    sketch: VagueSketch,
    exact_keys: torch.Tensor,
    exact_values: torch.Tensor,
    exact_pos: torch.Tensor,
    slots: torch.Tensor,
    vague_pos: torch.Tensor | None,
    move: torch.Tensor,
) -> None:
    """Swap (``vague_pos`` given) or fold the pairs where ``move``, in place on the exact store and the sketch.

    Args:
        sketch: the layer's Vague sketch (``width`` > 0, 1 or 3 rows, as the decode kernel needs).
        exact_keys, exact_values: ``(B, H, E, D)`` contiguous; exact_pos: ``(B, H, E)`` int32 contiguous.
        slots: ``(B, H, M)`` long, the exact slots whose tokens enter the sketch (distinct within a head).
        vague_pos: ``(B, H, M)`` long, the Vague positions that take those slots, or None for a fold.
        move: ``(B, H, M)`` bool, the pairs that move; the others are left alone.
    """
    b, h, m = slots.shape
    if m == 0:
        return
    if not all(t.is_contiguous() for t in (exact_keys, exact_values, exact_pos, sketch.keys, sketch.values)):
        raise ValueError("the trade kernel writes the exact store and the sketch in place: they must be contiguous")
    e, d = exact_keys.shape[2], exact_keys.shape[3]
    swap = vague_pos is not None
    estimates = exact_keys.new_empty(2, b, h, m, d) if swap else exact_keys.new_empty(2, 1, 1, 1, d)
    counts = sketch.counts if sketch.counts is not None else exact_pos  # not read without MEAN
    with torch.cuda.device(exact_keys.device):
        _trade[(b * h,)](
            exact_keys, exact_values, exact_pos, sketch.keys, sketch.values, counts, sketch.buckets, sketch.offsets,
            sketch.row_terms, slots.contiguous(), (vague_pos if swap else slots).contiguous(),
            move.contiguous().view(torch.int8), estimates[0], estimates[1],
            h, e, m, sketch.width,
            D=d, DP=max(16, triton.next_power_of_2(d)), ROWS=sketch.rows, MEAN=sketch.counts is not None,
            SIGNED_KEYS=sketch.signed_keys, SWAP=swap, BLOCK_P=PAIRS_PER_BLOCK, num_warps=1,
        )
