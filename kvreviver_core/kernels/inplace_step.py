"""KVReviver's decode step on CUDA with no host round trip: the store written in place, Algorithm 3 on the device.

A layer takes this path at its decode steps on the Triton kernel once every sequence compresses (from prefill on,
for any fraction below 1). :class:`InplaceStore` then holds the layer's step-to-step state at fixed addresses:

* the exact store ``(B, H, E, D)`` with room for ``max(Candidate + Recent) + 1`` tokens, so a new token goes into a
  free slot (position -1) instead of a ``torch.cat`` at every step;
* the cumulative scores ``(B, H, capacity)`` fp32, and what the decode kernel would otherwise rebuild at every step:
  the part map ``(B, H, capacity)`` int8 (MASKED / VAGUE / EXACT, :mod:`.reviver_decode`) and the positions' bucket
  codes ``(B, r, capacity)`` int32; ``capacity`` grows by ``LENGTH_CHUNK``. Under the linear combine also the bucket
  order of the positions hashed when the buffers last grew (:func:`~.reviver_decode.bucket_order`, ``(B, r, N)``
  int32 twice, and where each bucket's run starts).

The length, the Recent count and the first Recent position live on the device too, and every kernel reads them
there, so one step's launches and arguments are those of the next until a buffer grows: a CUDA graph can replay
it (:mod:`kvreviver_core.graphs`). A step is the length's increment and these Triton launches: :func:`append`
(``_append``, which also does the Recent bookkeeping) before attention, the decode kernel's split-K pass
(:func:`attend`, whose grid covers the capacity; under the linear combine the bucket logits, then
``_vague_logits``, while the exact splits run on the side stream), then :func:`compress`. On Hopper the launches of
the current stream after the append are its programmatic dependents (:data:`~.reviver_decode.PDL`):

0. under the linear combine, ``_position_pass``'s bucket sums: the buckets' weights, and ``_bucket_values``: their
   product with the bucket values, the Vague share of the output;
1. ``_combine`` without the mass: the attention output, which is all the model waits for;
2. on the device's side stream (:mod:`.side_stream`) when another layer follows in the step, so that they run beside
   the rest of the step: ``_position_pass``'s score programs, a grid over (sequence, KV head, chunk of 1024
   positions), which add the step's attention mass to the scores and keep each chunk's highest Vague score; then
   ``_compress``, one program per (sequence, KV head), Algorithm 3. It folds the lowest-scored Candidates beyond the
   Candidate share into the sketch (after a Recent hand-over);
3. then the paper's swap loop: while the lowest Candidate's score x ReplaceRate is below the highest Vague score, the
   Vague token returns to the exact store holding the sketch's estimate of it, which is deleted from the sketch,
   and the Candidate is inserted in its place. The highest Vague score comes from the chunks' highest; a swap
   rescans only the chunk of the token it took.

The swaps of one round (up to ``PAIRS_PER_ROUND``) read their estimates before any bucket changes, as the torch
path's batched :meth:`~kvreviver_core.sketch.VagueSketch.swap` does; a head that swaps more in one step runs more
rounds. The torch path gives the same tokens, slots aside (tests/test_kernel.py, on a GPU).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvreviver_core.kernels import side_stream
from kvreviver_core.kernels.reviver_decode import (_EXACT, _VAGUE, CHUNK_POSITIONS, EXACT, VAGUE, DecodeSplits, _bucket,
                                                   _estimate_rows, _highest_vague, _row_slots, _slot_code,
                                                   attend_splits, bucket_order, chain_launches, chunk_tops,
                                                   combine_splits, gdc_launch_dependents, position_pass, slot_codes,
                                                   tile_pad)

LENGTH_CHUNK = 64  # positions the scores, part map and codes grow by
PAIRS_PER_ROUND = 16  # swaps whose estimates are read together
BLOCK_SLOTS = 4096  # exact slots per loop step of the one-program-per-head scans (_append, _compress)
BLOCK_CHUNKS = 256  # chunks' highest Vague scores per loop step of _compress


@triton.jit
def _append(EK, EV, EPOS, PART, CODES, KNEW, VNEW, BUCKETS, OFFSETS, ROW_TERMS, LENGTH, RECENT_COUNT, RECENT_SIZE,
            RECENT_BASE, RECENT_START, stride_kb, stride_kh, stride_vb, stride_vh, H, E, part_stride, code_stride,
            width, D: tl.constexpr, DP: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr,
            CHAINED: tl.constexpr):
    """Write the new token of each (sequence, KV head) into its first free exact slot; mark it EXACT and hash its
    bucket codes. The token's position is ``LENGTH - 1``. Each sequence's first program also does the Recent
    bookkeeping: one more Recent token, and past the Recent share a hand-over back to ``RECENT_BASE`` tokens (the
    oldest become Candidates), which moves the first Recent position ``RECENT_START``. CHAINED: the attention's
    chain, launched as its dependents, may start at once (it waits for this kernel before it reads what it writes)."""
    if CHAINED:
        gdc_launch_dependents()
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    position = tl.load(LENGTH) - 1
    free = tl.full((), E, tl.int32)
    for start in range(0, E, BLOCK_E):
        slot = start + tl.arange(0, BLOCK_E)
        pos = tl.load(EPOS + bh * E + slot, mask=slot < E, other=0)
        free = tl.minimum(free, tl.min(tl.where(pos < 0, slot, E), 0))
    di = tl.arange(0, DP)
    room = (di < D) & (free < E)
    entry = (bh * E + free) * D + di
    tl.store(EK + entry, tl.load(KNEW + b * stride_kb + h * stride_kh + di, mask=di < D), mask=room)
    tl.store(EV + entry, tl.load(VNEW + b * stride_vb + h * stride_vh + di, mask=di < D), mask=room)
    tl.store(EPOS + bh * E + free, position.to(tl.int32), mask=free < E)
    tl.store(PART + bh * part_stride + position, _EXACT)
    nb = tl.maximum(tl.load(BUCKETS + b), 1)
    logical = position - tl.load(OFFSETS + b)
    for row in tl.static_range(ROWS):
        tl.store(CODES + (b * ROWS + row) * code_stride + position, _slot_code(logical, nb, width, ROW_TERMS, row),
                 mask=h == 0)
    if h == 0:
        recent = tl.load(RECENT_COUNT + b) + 1
        handover = recent > tl.load(RECENT_SIZE + b)
        recent = tl.where(handover, tl.load(RECENT_BASE + b), recent)
        tl.store(RECENT_COUNT + b, recent)
        tl.store(RECENT_START + b, position + 1 - recent, mask=handover)


@triton.jit
def _add_token(HEAD_KEYS, HEAD_VALUES, HEAD_COUNTS, logical, key, value, nb, width, ROW_TERMS, di, dmask,
               WEIGHT: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, MEAN: tl.constexpr,
               SIGNED_KEYS: tl.constexpr):
    """Add ``WEIGHT`` (+1 insert, -1 delete) x one token's key, signed value and count to its bucket in each row."""
    for row in tl.static_range(ROWS):
        slot, sign = _bucket(logical, nb, width, ROW_TERMS, row)
        signed = (sign * WEIGHT).to(tl.float32)
        key_weight = signed if SIGNED_KEYS else WEIGHT
        offs = slot * D + di
        k = tl.load(HEAD_KEYS + offs, mask=dmask).to(tl.float32) + key.to(tl.float32) * key_weight
        tl.store(HEAD_KEYS + offs, k.to(HEAD_KEYS.dtype.element_ty), mask=dmask)
        v = tl.load(HEAD_VALUES + offs, mask=dmask).to(tl.float32) + value.to(tl.float32) * signed
        tl.store(HEAD_VALUES + offs, v.to(HEAD_VALUES.dtype.element_ty), mask=dmask)
        if MEAN:
            tl.store(HEAD_COUNTS + slot, tl.load(HEAD_COUNTS + slot) + WEIGHT)


@triton.jit
def _lowest_candidate(epos, scores, recent_start, E, BLOCK_E: tl.constexpr):
    """The lowest Candidate's score and slot (+inf and -1 without one), and the number of Candidates."""
    best = tl.full((), float("inf"), tl.float32)
    best_slot = tl.full((), -1, tl.int32)
    count = tl.zeros((), tl.int32)
    for start in range(0, E, BLOCK_E):
        slot = start + tl.arange(0, BLOCK_E)
        pos = tl.load(epos + slot, mask=slot < E, other=-1)
        candidate = (pos >= 0) & (pos < recent_start)
        score = tl.load(scores + pos, mask=candidate, other=float("inf"))
        low = tl.min(score, 0)
        best_slot = tl.where(low < best, start + tl.argmin(score, 0), best_slot)
        best = tl.minimum(best, low)
        count += tl.sum(candidate.to(tl.int32), 0)
    return best, best_slot, count


@triton.jit
def _highest_of_chunks(chunk_top, chunk_pos, chunks, BLOCK_C: tl.constexpr):
    """The highest Vague score over the chunks' highest and its position (the first of equal ones; -inf and -1
    without one)."""
    best = tl.full((), float("-inf"), tl.float32)
    best_pos = tl.full((), -1, tl.int32)
    for start in range(0, chunks, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        top = tl.load(chunk_top + c, mask=c < chunks, other=float("-inf"))
        high = tl.max(top, 0)
        best_pos = tl.where(high > best, tl.load(chunk_pos + start + tl.argmax(top, 0)), best_pos)
        best = tl.maximum(best, high)
    return best, best_pos


@triton.jit
def _rescan_chunk(scores, part, chunk_top, chunk_pos, position, N, CHUNK: tl.constexpr):
    """Recompute the highest Vague score of the chunk holding ``position`` (a Vague token left it)."""
    chunk = position // CHUNK
    p = chunk * CHUNK + tl.arange(0, CHUNK)
    inside = p < N
    vague = inside & (tl.load(part + p, mask=inside, other=0) == _VAGUE)
    high, high_pos = _highest_vague(tl.load(scores + p, mask=inside, other=0.0), vague, chunk * CHUNK)
    tl.store(chunk_top + chunk, high)
    tl.store(chunk_pos + chunk, high_pos)


@triton.jit
def _raise_chunk(chunk_top, chunk_pos, position, score, CHUNK: tl.constexpr):
    """A token at ``position`` with ``score`` turned Vague: its chunk's highest, if it is above (or level and
    first)."""
    chunk = position // CHUNK
    top = tl.load(chunk_top + chunk)
    top_pos = tl.load(chunk_pos + chunk)
    above = (score > top) | ((score == top) & (position < top_pos))
    tl.store(chunk_top + chunk, tl.where(above, score, top))
    tl.store(chunk_pos + chunk, tl.where(above, position, top_pos).to(tl.int32))


@triton.jit
def _apply_swaps(EK, EV, head_keys, head_values, head_counts, pairs_slot, pairs_in, pairs_out, est_k_row,
                 est_v_row, count, bhE, offset, nb, width, ROW_TERMS, code_rows, code_stride, di, dmask,
                 D: tl.constexpr, ROWS: tl.constexpr, MEAN: tl.constexpr, SIGNED_KEYS: tl.constexpr,
                 LINEAR: tl.constexpr, PAIRS: tl.constexpr):
    """Trade the round's ``count`` pairs: every estimate first, then per pair delete it, store it, insert the
    Candidate that leaves."""
    pi = tl.arange(0, PAIRS)
    moving = pi < count
    entering = tl.load(pairs_in + pi, mask=moving, other=0)
    slot0, slot1, slot2, sign0, sign1, sign2 = _row_slots(code_rows, entering, moving, code_stride, ROWS)
    est_k = _estimate_rows(head_keys, head_counts, slot0, slot1, slot2, sign0, sign1, sign2, moving, di, dmask,
                           D, ROWS, MEAN, SIGNED_KEYS, LINEAR)
    est_v = _estimate_rows(head_values, head_counts, slot0, slot1, slot2, sign0, sign1, sign2, moving, di, dmask,
                           D, ROWS, MEAN, True, LINEAR)
    both = moving[:, None] & dmask[None, :]
    tl.store(est_k_row + pi[:, None] * D + di[None, :], est_k.to(est_k_row.dtype.element_ty), mask=both)
    tl.store(est_v_row + pi[:, None] * D + di[None, :], est_v.to(est_v_row.dtype.element_ty), mask=both)
    tl.debug_barrier()
    for i in range(0, count):
        slot = tl.load(pairs_slot + i)
        entry = (bhE + slot) * D + di
        leaving_k = tl.load(EK + entry, mask=dmask)
        leaving_v = tl.load(EV + entry, mask=dmask)
        returning_k = tl.load(est_k_row + i * D + di, mask=dmask)
        returning_v = tl.load(est_v_row + i * D + di, mask=dmask)
        returning = tl.load(pairs_in + i).to(tl.int64)
        _add_token(head_keys, head_values, head_counts, returning - offset, returning_k, returning_v, nb, width,
                   ROW_TERMS, di, dmask, -1, D, ROWS, MEAN, SIGNED_KEYS)
        tl.debug_barrier()  # the insert below may hit the same buckets
        tl.store(EK + entry, returning_k, mask=dmask)
        tl.store(EV + entry, returning_v, mask=dmask)
        leaving = tl.load(pairs_out + i).to(tl.int64)
        _add_token(head_keys, head_values, head_counts, leaving - offset, leaving_k, leaving_v, nb, width,
                   ROW_TERMS, di, dmask, 1, D, ROWS, MEAN, SIGNED_KEYS)
        tl.debug_barrier()  # the next pair reads what this one wrote


@triton.jit
def _compress(
    SCORES, CHUNK_TOP, CHUNK_POS, PART, CODES, EK, EV, EPOS,
    SK, SV, SCNT, BUCKETS, OFFSETS, ROW_TERMS, LENGTH, RECENT_START, CANDIDATES, PAIR_SLOT, PAIR_IN, PAIR_OUT, EST_K,
    EST_V, H, E, width, row_stride, code_stride, chunks, replace_rate,
    D: tl.constexpr, DP: tl.constexpr, ROWS: tl.constexpr, MEAN: tl.constexpr, SIGNED_KEYS: tl.constexpr,
    LINEAR: tl.constexpr, PAIRS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Algorithm 3 of one (sequence, KV head), steps 2 and 3 of the module docstring: grid ``(B * H,)``."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    N = tl.load(LENGTH).to(tl.int32)
    di = tl.arange(0, DP)
    dmask = di < D
    scores, part, epos = SCORES + bh * row_stride, PART + bh * row_stride, EPOS + bh * E
    chunk_top, chunk_pos = CHUNK_TOP + bh * chunks, CHUNK_POS + bh * chunks
    code_rows = CODES + b * ROWS * code_stride
    has_buckets = tl.load(BUCKETS + b) > 0
    nb = tl.maximum(tl.load(BUCKETS + b), 1)
    offset = tl.load(OFFSETS + b)
    recent_start = tl.load(RECENT_START + b)
    sbase = bh * (ROWS * width)  # this KV head's first bucket
    head_keys, head_values, head_counts = SK + sbase * D, SV + sbase * D, SCNT + sbase
    pairs_slot, pairs_in, pairs_out = PAIR_SLOT + bh * PAIRS, PAIR_IN + bh * PAIRS, PAIR_OUT + bh * PAIRS
    est_k_row, est_v_row = EST_K + bh * PAIRS * D, EST_V + bh * PAIRS * D

    # The scores already hold the step's mass, and the chunks' highest Vague scores are known (_position_pass).
    top, top_pos = _highest_of_chunks(chunk_top, chunk_pos, chunks, BLOCK_C)
    low, low_slot, candidates = _lowest_candidate(epos, scores, recent_start, E, BLOCK_E)

    # Fold: Candidate outgrows its share only after Recent hands tokens over.
    excess = candidates - tl.load(CANDIDATES + b).to(tl.int32)
    while excess > 0:
        entry = (bh * E + low_slot) * D + di
        folded = tl.load(epos + low_slot).to(tl.int64)
        if has_buckets:  # a row without buckets drops what it folds
            _add_token(head_keys, head_values, head_counts, folded - offset, tl.load(EK + entry, mask=dmask),
                       tl.load(EV + entry, mask=dmask), nb, width, ROW_TERMS, di, dmask, 1, D, ROWS, MEAN,
                       SIGNED_KEYS)
        tl.store(epos + low_slot, -1)
        tl.store(part + folded, _VAGUE)
        _raise_chunk(chunk_top, chunk_pos, folded.to(tl.int32), low, CHUNK)
        top_pos = tl.where(low > top, folded.to(tl.int32), top_pos)
        top = tl.maximum(top, low)
        tl.debug_barrier()
        excess -= 1
        low, low_slot, candidates = _lowest_candidate(epos, scores, recent_start, E, BLOCK_E)

    # Swap: the paper's loop, one pair at a time; the pairs' K/V move in rounds.
    pending = tl.zeros((), tl.int32)
    swapping = has_buckets & (low * replace_rate < top)
    while swapping:
        leaving = tl.load(epos + low_slot)
        tl.store(pairs_slot + pending, low_slot)
        tl.store(pairs_in + pending, top_pos)
        tl.store(pairs_out + pending, leaving)
        tl.store(epos + low_slot, top_pos)
        tl.store(part + top_pos, _EXACT)
        tl.store(part + leaving, _VAGUE)
        pending += 1
        tl.debug_barrier()
        # The choice of the next pair reads positions and scores only, so the round can move after it.
        _rescan_chunk(scores, part, chunk_top, chunk_pos, top_pos, N, CHUNK)
        tl.debug_barrier()
        _raise_chunk(chunk_top, chunk_pos, leaving, low, CHUNK)
        tl.debug_barrier()
        top, top_pos = _highest_of_chunks(chunk_top, chunk_pos, chunks, BLOCK_C)
        low, low_slot, candidates = _lowest_candidate(epos, scores, recent_start, E, BLOCK_E)
        swapping = low * replace_rate < top
        if (pending == PAIRS) | (swapping == 0):
            _apply_swaps(EK, EV, head_keys, head_values, head_counts, pairs_slot, pairs_in, pairs_out, est_k_row,
                         est_v_row, pending, bh * E, offset, nb, width, ROW_TERMS, code_rows, code_stride, di, dmask,
                         D, ROWS, MEAN, SIGNED_KEYS, LINEAR, PAIRS)
            pending = tl.zeros((), tl.int32)


class InplaceStore:
    """A layer's step-to-step state at fixed addresses, for the in-place decode step.

    Besides the scores, part map and codes (module docstring) it keeps on the device what a step reads or moves,
    so that no step needs the host: the logical length ``length`` ``(1,)`` (the step's token included once
    :func:`append` ran), the Recent count ``recent_count`` ``(B,)`` and the first Recent position
    ``recent_start`` ``(B, 1, 1)``. The host only tracks the length (:meth:`advance`) to grow the buffers. And
    ``tops``, the position pass's highest Vague score of each chunk and its position (step scratch, kept at a fixed
    address because Algorithm 3 may read it on the side stream after the step's other buffers are freed).

    Args:
        scores: ``(B, H, N)`` fp32, the layer's cumulative scores; exact_pos: ``(B, H, E)`` int32 (-1 = empty);
        valid: ``(B, N)`` bool, the non-padding positions; sketch: the layer's VagueSketch; recent_count,
        recent_size, recent_base: ``(B,)`` int, the Recent bookkeeping (host or device); recent_start:
        ``(B, 1, 1)`` int64 on the device, updated in place.
    """

    def __init__(self, scores: torch.Tensor, exact_pos: torch.Tensor, valid: torch.Tensor, sketch,
                 recent_count: torch.Tensor, recent_size: torch.Tensor, recent_base: torch.Tensor,
                 recent_start: torch.Tensor) -> None:
        b, h, n = scores.shape
        device = scores.device
        self.host_length = n
        self.length = torch.full((1,), n, dtype=torch.long, device=device)
        self.recent_count = recent_count.to(device=device, dtype=torch.long)
        self.recent_size = recent_size.to(device=device, dtype=torch.long)
        self.recent_base = recent_base.to(device=device, dtype=torch.long)
        self.recent_start = recent_start
        self.scores_buffer = scores.new_zeros(b, h, 0)
        self.part = torch.zeros(b, h, 0, dtype=torch.int8, device=device)
        self.codes = torch.zeros(b, sketch.rows, 0, dtype=torch.int32, device=device)
        self.order = None
        self.tops = chunk_tops(b * h, 0, device)
        self.reserve(n + 1)  # column n (the next token's) takes the empty slots' writes below, then is cleared
        slot_codes(sketch, n, out=self.codes)
        # The linear combine sums the bucket weights of these positions through their bucket order.
        self.order = bucket_order(self.codes, n, sketch.width) if sketch.combine == "mean" else None
        self.scores_buffer[:, :, :n] = scores
        self.part[:, :, :n] = valid.unsqueeze(1).to(torch.int8) * VAGUE
        self.part.scatter_(2, torch.where(exact_pos >= 0, exact_pos.long(), n), EXACT)
        self.part[:, :, n] = 0

    @property
    def capacity(self) -> int:
        return self.part.shape[-1]

    def reserve(self, length: int, hashed: int | None = None) -> None:
        """Make room for ``length`` positions (a new buffer, grown by LENGTH_CHUNK, only when they do not fit).

        A bucket order is then rebuilt over the first ``hashed`` positions (default: the host's length), those whose
        codes the launches so far write, so that the positions added since are summed through it too instead of
        one atomic add each. The buffers move anyway, and so would a captured step's addresses."""
        capacity = self.capacity
        if length <= capacity:
            return
        capacity = triton.cdiv(length, LENGTH_CHUNK) * LENGTH_CHUNK
        grown = []
        for old in (self.scores_buffer, self.part, self.codes):
            new = old.new_zeros(*old.shape[:-1], capacity)
            new[..., : old.shape[-1]] = old
            grown.append(new)
        self.scores_buffer, self.part, self.codes = grown
        self.tops = chunk_tops(self.part.shape[0] * self.part.shape[1], capacity, self.part.device)
        if self.order is not None:
            width = self.order.runs.shape[-1] - 1
            self.order = bucket_order(self.codes, self.host_length if hashed is None else hashed, width)

    def advance(self, tokens: int) -> None:
        """The host's side of a step of ``tokens`` new tokens (before their append): its length, and room for them."""
        self.host_length += tokens
        self.reserve(self.host_length, hashed=self.host_length - tokens)

    def scores(self, length: int) -> torch.Tensor:
        """The first ``length`` positions' scores ``(B, H, length)``, a view of the buffer."""
        return self.scores_buffer[:, :, :length]

    def nbytes(self) -> int:
        kept = (self.scores_buffer, self.part, self.codes, *(self.order or ()))
        return sum(t.numel() * t.element_size() for t in kept)


def exact_capacity(exact_slots: int, candidate: torch.Tensor, recent: torch.Tensor) -> int:
    """Slots the in-place store needs: the most any sequence holds at once, its new token included."""
    return max(exact_slots, int((candidate.cpu() + recent.cpu()).max()) + 1)


def append(store: InplaceStore, exact_keys: torch.Tensor, exact_values: torch.Tensor, exact_pos: torch.Tensor,
           sketch, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    """Write the step's token ``(B, H, 1, D)`` into a free slot of each (sequence, KV head), at the next position.
    The host calls :meth:`InplaceStore.advance` for the step first."""
    b, h, e, d = exact_keys.shape
    with torch.cuda.device(exact_keys.device):
        store.length.add_(1)
        _append[(b * h,)](
            exact_keys, exact_values, exact_pos, store.part, store.codes, key_states, value_states,
            sketch.buckets, sketch.offsets, sketch.row_terms, store.length, store.recent_count, store.recent_size,
            store.recent_base, store.recent_start,
            key_states.stride(0), key_states.stride(1), value_states.stride(0), value_states.stride(1),
            h, e, store.part.stride(1), store.codes.stride(1), sketch.width,
            D=d, DP=tile_pad(d), ROWS=sketch.rows, BLOCK_E=BLOCK_SLOTS, CHAINED=chain_launches(exact_keys.device),
        )


def attend(store: InplaceStore, query: torch.Tensor, exact_keys: torch.Tensor, exact_values: torch.Tensor,
           exact_pos: torch.Tensor, sketch, scaling: float) -> DecodeSplits:
    """The decode kernel's split-K pass over the store's positions; :func:`compress` combines it. Its grid covers
    the store's capacity, and the kernel reads the length from the device."""
    with torch.cuda.device(query.device):
        return attend_splits(query, exact_keys, exact_values, exact_pos, sketch, store.part, store.codes,
                             store.length, store.capacity, scaling, after_append=True)


def compress(store: InplaceStore, step: torch.Tensor | DecodeSplits, exact_keys: torch.Tensor,
             exact_values: torch.Tensor, exact_pos: torch.Tensor, sketch, candidate_size: torch.Tensor,
             replace_rate: float, beside: bool = False) -> None:
    """Algorithm 3 after one decode step, in place (module docstring).

    Args:
        step: the step's attention mass ``(B, H, N)`` fp32 over the store's ``N`` positions, or the decode's
            :func:`attend` results: then these launches also combine them into ``step.out`` and take the mass from
            their logits (``_combine``'s work, without its mass).
        exact store as in ``append``; sketch: the layer's :class:`~kvreviver_core.sketch.VagueSketch` (``width``
            > 0, 1 or 3 rows); candidate_size: ``(B,)`` the Candidate share.
        beside: launch the scores' update and ``_compress`` on the device's side stream (:mod:`.side_stream`), so
            that they run beside what the model does next; the caller joins it before anything reads the store
            again. The buckets' weights and the output are on the current stream before they start, and the step's
            logits and partial sums are kept until the join.
    """
    b, h, e, d = exact_keys.shape
    device = exact_keys.device
    pairs, estimates = _swap_scratch(device, b * h, d, exact_keys.dtype)
    counts = sketch.counts if sketch.counts is not None else exact_pos  # not read without MEAN
    chunk_top, chunk_pos = store.tops
    with torch.cuda.device(device):
        if isinstance(step, DecodeSplits):
            # The output waits on the bucket weights, not on the scores: those are Algorithm 3's, beside it.
            if step.linear:
                position_pass(step, order=store.order)
            combine_splits(step)
            read_beside = (step.logits, step.max, step.sum)

            def add_mass() -> None:
                position_pass(step, scores=store.scores_buffer, tops=store.tops, bucket_weights=False)
        else:
            mass = step.contiguous()
            read_beside = (mass,)

            def add_mass() -> None:
                position_pass(None, scores=store.scores_buffer, mass=mass, part=store.part, codes=store.codes,
                              length=store.length, tops=store.tops)

        def algorithm_3() -> None:
            add_mass()
            _compress[(b * h,)](
                store.scores_buffer, chunk_top, chunk_pos, store.part, store.codes, exact_keys,
                exact_values, exact_pos, sketch.keys, sketch.values, counts, sketch.buckets, sketch.offsets,
                sketch.row_terms, store.length, store.recent_start, candidate_size, pairs[0], pairs[1], pairs[2],
                estimates[0], estimates[1], h, e, sketch.width, store.part.stride(1), store.codes.stride(1),
                chunk_top.shape[1], float(replace_rate),
                D=d, DP=tile_pad(d), ROWS=sketch.rows, MEAN=sketch.counts is not None,
                SIGNED_KEYS=sketch.signed_keys, LINEAR=sketch.combine == "mean", PAIRS=PAIRS_PER_ROUND,
                BLOCK_E=BLOCK_SLOTS, BLOCK_C=BLOCK_CHUNKS, CHUNK=CHUNK_POSITIONS, num_warps=8,
            )

        if beside:
            side_stream.launch_beside(device, algorithm_3, keep=read_beside)
        else:
            algorithm_3()


@functools.lru_cache(maxsize=4)
def _swap_scratch(device: torch.device, heads: int, head_dim: int, dtype: torch.dtype):
    """``_compress``'s scratch, ``(3, heads, PAIRS_PER_ROUND)`` int32 pairs and ``(2, heads, PAIRS_PER_ROUND,
    head_dim)`` estimates: one per device and shape, at a fixed address (a CUDA graph replays it, and a launch on
    the side stream must not read memory that the current stream's allocator hands out again). One Algorithm 3 runs
    at a time on a device: the side stream's are joined before the next layer's step."""
    return (torch.empty(3, heads, PAIRS_PER_ROUND, dtype=torch.int32, device=device),
            torch.empty(2, heads, PAIRS_PER_ROUND, head_dim, dtype=dtype, device=device))
