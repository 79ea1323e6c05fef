"""``kvreviver``: Recent + Candidate kept exactly, every other token folded into a Count-Sketch (the paper).

Storage of one layer (B = batch, H = KV heads, E = exact slots, N = logical length, D = head_dim):

* exact store ``exact_keys/exact_values`` ``(B, H, E, D)`` with ``exact_pos`` ``(B, H, E)`` (int32, -1 = empty).
  It holds Recent (the ``recent_count`` newest tokens of each sequence) and Candidate (the other exact tokens).
  Candidate sets differ between KV heads, because scores are per KV head.
* ``scores`` ``(B, H, N)`` fp32: cumulative softmax(QK^T) of every token. Vague tokens need theirs for the
  swap-back test, so it is kept for all tokens and charged to the budget, as are the in-place decode step's part map
  (a byte per token and KV head) and bucket codes (4 bytes per token and sketch row; 8 more under the linear
  combine on a device that runs the kernel, whichever decode path ``fused`` picks: the bucket order).
* ``sketch``: the Vague part (:class:`~kvreviver_core.sketch.VagueSketch`), r rows x b buckets.

Compress (Algorithm 3, run after every attention call): when Recent exceeds its share, its oldest tokens become
Candidates in bulk; the lowest-scored Candidates beyond the Candidate share go into the sketch; then, while the
lowest Candidate score x ReplaceRate is below the highest Vague score, the two swap. Pairing the k lowest
Candidates with the k highest Vague tokens and swapping the prefix where the test holds gives the same result as
the paper's one-at-a-time loop for ReplaceRate >= 1; k is the number of Vague tokens above the lowest Candidate's
score x ReplaceRate, since no other Vague token can pass the test.

Swap-back: a returning token is read from the sketch (its reconstruction at that moment), that estimate is
deleted from the sketch, and the estimate is what the exact store holds from then on. The original K/V are gone
once folded; that is the paper's Algorithm 3.

Revive (Algorithm 4): the sketch is queried at every position, the exact tokens are written over their positions,
and the layer's full K/V exist only for the duration of its attention call. A decode step can skip revival
(option ``fused``): ``fused_attention`` then attends straight from the exact store and the sketch
(:mod:`kvreviver_core.kernels`) and feeds the resulting attention mass to ``observe`` as the unfused path does. Once
every sequence compresses, a step that runs the Triton kernel runs in place (``kernels/inplace_step.py``): the store
gets a fixed capacity, the new token is written into a free slot, and Algorithm 3 runs on the device with no host
read, with the torch code's results.

A sequence is compressed from the moment its tokens exceed the budget's capacity (at prefill for any fraction
below 1). With a Vague share of 0, there is no sketch: tokens leaving Candidate are dropped and masked, which is the
ablation of the Vague part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvreviver_core.attention import _key_validity
from kvreviver_core.budget import TUNABLE_FIELDS, Budget, split_capacity, token_capacity
from kvreviver_core.kernels import check_fused_option, decode_backend, inplace_kernels
from kvreviver_core.methods.base import CompressedLayer, Method, register, tensor_bytes
from kvreviver_core.sketch import COMBINES, ESTIMATORS, Combine, Estimator, VagueSketch

SCORE_BYTES = 4  # fp32 cumulative score per token and KV head
PART_BYTES = 1  # the in-place decode step's part map, per token and KV head
CODE_BYTES = 4  # and each token's bucket code in each sketch row
ORDER_BYTES = 8  # the linear combine's bucket order: position and code, per token and sketch row
POSITION_BYTES = 4  # int32 position per exact slot and KV head


class ReviverLayer(CompressedLayer):
    def __init__(self, layer_idx: int, budget: Budget, estimator: Estimator = "sum", seed: int = 0,
                 fused: bool | str = "auto", signed_keys: bool = False, combine: Combine = "median",
                 overlap: bool = True) -> None:
        super().__init__(layer_idx, budget)
        self.fused = fused
        self.overlap = overlap
        self.signed_keys = signed_keys
        self.combine = combine
        self._decode = None  # the fused decode attention chosen by update() for the step in progress
        self._kernels = None  # the in-place step's kernels (kernels/inplace_step.py) while it runs
        self._inplace = None  # and its InplaceStore
        self.estimator = estimator
        self.seed = seed * 1_000_003 + layer_idx
        self.sketch: VagueSketch | None = None
        self.compressing: torch.Tensor | None = None
        self._all_compressing = False

    # -- storage ---------------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h = self.batch, self.heads
        self.exact_keys = key_states[:, :, :0]
        self.exact_values = value_states[:, :, :0]
        self.exact_pos = torch.empty(b, h, 0, dtype=torch.int32, device=self.device)
        self.scores = torch.empty(b, h, 0, dtype=torch.float32, device=self.device)
        # Host-side bookkeeping: the Recent counts only grow by the step's length or reset to a planned size, so the
        # decision to hand Recent over needs no device read.
        self.recent_count = torch.zeros(b, dtype=torch.long)
        self._recent_start: torch.Tensor | None = None  # (B, 1, 1) on the device, first Recent position

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, t, _ = key_states.shape
        fusable = t == 1 and self.offsets is not None
        self._decode = decode_backend(self.fused, key_states, self.sketch) if fusable else None
        self._kernels = inplace_kernels(self._decode) if self._all_compressing else None
        if self._kernels is None:
            self._leave_inplace()  # any other step changes the store its own way; a later one starts afresh
        elif self._inplace is None:
            self._enter_inplace()
        if self._inplace is not None:
            self._advance_inplace(t)
            self._kernels.append(self._inplace, self.exact_keys, self.exact_values, self.exact_pos, self.sketch,
                                 key_states, value_states)
            return key_states.expand(b, h, self.logical_len, -1), value_states.expand(b, h, self.logical_len, -1)
        past = self.revive() if self.logical_len and self._decode is None else None
        new_pos = torch.arange(self.logical_len, self.logical_len + t, device=self.device, dtype=torch.int32)
        self.exact_keys = torch.cat([self.exact_keys, key_states], dim=2)
        self.exact_values = torch.cat([self.exact_values, value_states], dim=2)
        self.exact_pos = torch.cat([self.exact_pos, new_pos.expand(b, h, t)], dim=2)
        self.scores = torch.nn.functional.pad(self.scores, (0, t))
        self.recent_count += t
        self.logical_len += t
        if self._decode is not None:
            # fused_attention reads the compressed store itself; the model only needs the length (stride-0 views).
            return key_states.expand(b, h, self.logical_len, -1), value_states.expand(b, h, self.logical_len, -1)
        if past is None:
            return key_states, value_states
        return torch.cat([past[0], key_states], dim=2), torch.cat([past[1], value_states], dim=2)

    def revive(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 4: all ``logical_len`` keys and values in position order, ``(B, H, N, D)`` each."""
        b, h, n, d = self.batch, self.heads, self.logical_len, self.head_dim
        if self.sketch is not None:
            positions = torch.arange(n, device=self.device).expand(b, h, n)
            keys, values = self.sketch.query(positions)
            keys = torch.cat([keys, keys.new_zeros(b, h, 1, d)], dim=2)
            values = torch.cat([values, values.new_zeros(b, h, 1, d)], dim=2)
        else:
            keys = self.exact_keys.new_zeros(b, h, n + 1, d)
            values = self.exact_values.new_zeros(b, h, n + 1, d)
        # Empty slots write into the extra column n, which is then cut off.
        slot = torch.where(self.exact_pos >= 0, self.exact_pos, n).long().unsqueeze(-1).expand(-1, -1, -1, d)
        keys.scatter_(2, slot, self.exact_keys)
        values.scatter_(2, slot, self.exact_values)
        return keys[:, :, :n], values[:, :, :n]

    def _enter_inplace(self) -> None:
        """Give the exact store its fixed capacity and keep the scores in the in-place step's buffer."""
        capacity = self._kernels.exact_capacity(self.exact_pos.shape[-1], self.candidate_size, self.recent_size)
        room = capacity - self.exact_pos.shape[-1]
        pad = torch.nn.functional.pad
        self.exact_keys = pad(self.exact_keys, (0, 0, 0, room)).contiguous()
        self.exact_values = pad(self.exact_values, (0, 0, 0, room)).contiguous()
        self.exact_pos = pad(self.exact_pos, (0, room), value=-1).contiguous()
        self._inplace = self._kernels.InplaceStore(self.scores, self.exact_pos, self.valid_positions()[:, 0],
                                                   self.sketch, self.recent_count, self.recent_size,
                                                   self.recent_base, self._recent_start)
        self.scores = self._inplace.scores(self.logical_len)

    def _leave_inplace(self) -> None:
        if self._inplace is not None:
            self.recent_count = self._inplace.recent_count.cpu()  # the device kept it during the in-place steps
            self._inplace = None

    def _advance_inplace(self, tokens: int) -> None:
        """The host's part of an in-place step: the lengths, and room in the buffers (all else is on the device)."""
        self._inplace.advance(tokens)
        self.logical_len += tokens
        self.scores = self._inplace.scores(self.logical_len)

    # -- CUDA graphs (kvreviver_core/graphs.py) --------------------------------------------------------------------
    def decode_graph_key(self) -> tuple | None:
        """The in-place step reads its lengths on the device, so a captured step replays as long as the buffers
        stay where they are: the key is their addresses and the capacity (room for the next token is made here)."""
        if self._inplace is None:
            return None
        self._inplace.reserve(self.logical_len + 1)
        store = self._inplace
        return (store.capacity, store.part.data_ptr(), store.codes.data_ptr(), store.scores_buffer.data_ptr(),
                self.exact_keys.data_ptr(), self.sketch.keys.data_ptr())

    def advance_replayed_step(self) -> None:
        self._advance_inplace(1)

    def exact_map(self) -> torch.Tensor:
        """``(B, H, N)`` bool: positions held in the exact store."""
        b, h, n = self.batch, self.heads, self.logical_len
        held = torch.zeros(b, h, n + 1, dtype=torch.bool, device=self.device)
        held.scatter_(2, torch.where(self.exact_pos >= 0, self.exact_pos, n).long(), True)
        return held[:, :, :n]

    def valid_positions(self) -> torch.Tensor:
        """``(B, 1, N)`` bool: non-padding positions."""
        return (torch.arange(self.logical_len, device=self.device).view(1, 1, -1) >= self.offsets.view(-1, 1, 1))

    # -- attention hooks -------------------------------------------------------------------------------------------
    def score_queries(self, query_length: int) -> int | None:
        return None

    def fused_attention(self, query, key, value, mask, scaling) -> torch.Tensor | None:
        """Decode step without revival: attention straight from the exact store and the sketch (kernels/)."""
        decode, self._decode = self._decode, None
        if decode is None:
            return None
        store = (self.exact_keys, self.exact_values, self.exact_pos, self.sketch)
        if self._inplace is not None:
            # The compress step's launch also combines the decode's splits (into step.out) and takes their mass.
            step = self._kernels.attend(self._inplace, query, *store, scaling)
            self._compress(step)
            return step.output()
        key_valid = _key_validity(mask, key)
        out, mass = decode(query, *store, key_valid, scaling)
        self.observe(mass, key_valid)
        return out

    def slot_mask(self) -> torch.Tensor | None:
        # The fused decode masks per head itself (the sketch's rows without buckets), from the store.
        if self.sketch is None or self._sketch_everywhere or self._decode is not None:
            return None
        # Rows without a sketch (Vague share 0, or too small a budget for one bucket per row) have dropped the
        # tokens outside their exact store, and each KV head holds its own set: mask per head.
        no_sketch = (~self.sketch.enabled).view(-1, 1, 1)
        return self.exact_map() | ~no_sketch

    def observe(self, scores: torch.Tensor | None, key_valid: torch.Tensor) -> None:
        first = self.offsets is None
        super().observe(scores, key_valid)
        if first:
            self._plan_capacity()
            # Padding never enters any part.
            pad = self.exact_pos.long() < self.offsets.view(-1, 1, 1)
            self.exact_pos = self.exact_pos.masked_fill(pad, -1)
        self._compress(None if scores is None else scores[:, :, : self.logical_len])

    # -- Algorithm 3 -----------------------------------------------------------------------------------------------
    def _plan_capacity(self) -> None:
        capacities, vague, candidate, recent = [], [], [], []
        row_bytes = CODE_BYTES + (ORDER_BYTES if self.combine == "mean" and self._kernel_device() else 0)
        per_token = (SCORE_BYTES + PART_BYTES) * self.heads + row_bytes * self.budget.sketch_rows
        for prompt in self.prompt_lengths.tolist():
            cap = token_capacity(self.budget, prompt, self.token_bytes(), per_token, POSITION_BYTES * self.heads)
            sizes = split_capacity(self.budget, max(cap, 0))
            capacities.append(cap)
            vague.append(sizes.vague_slots // self.budget.sketch_rows)
            candidate.append(sizes.candidate)
            recent.append(sizes.recent)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        self.capacity = as_tensor(capacities)
        self.candidate_size = as_tensor(candidate)
        self.recent_size = torch.tensor(recent, dtype=torch.long)  # host, as recent_count
        # The slack comes out of the Recent share: Recent refills from recent_base up to recent_size.
        slack = (self.recent_size - 1).clamp(max=self.budget.recent_slack).clamp(min=0)
        self.recent_base = self.recent_size - slack
        self.compressing = torch.zeros(self.batch, dtype=torch.bool)  # host
        self._swapping = torch.zeros(self.batch, 1, dtype=torch.bool, device=self.device)  # compressing, with a sketch
        self._sketch_everywhere = all(v > 0 for v in vague)
        padding = int(self.offsets.max())
        # (B, 1, P) over the first P positions: the padding, which never turns Vague (None without padding).
        self._pad_mask = self.valid_positions()[:, :, :padding].logical_not() if padding else None
        self.sketch = VagueSketch(
            self.batch, self.heads, self.head_dim, self.budget.sketch_rows, as_tensor(vague), self.offsets,
            self.dtype, self.device, seed=self.seed, estimator=self.estimator, signed_keys=self.signed_keys,
            combine=self.combine,
        )

    def _kernel_device(self) -> bool:
        """Whether this layer's dtype and device run the Triton kernel in place (whose store holds the bucket
        order). Asked whatever ``fused`` says: the budget is that of the device's store, so that the kernel, the
        reference and the unfused path of one device hold the same tokens and can be compared."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        return inplace_kernels(decode_backend(True, probe, None)) is not None

    def _compress(self, mass) -> None:
        """Add the step's attention ``mass`` ``(B, H, N)`` to the scores, then Algorithm 3. On the in-place step,
        ``mass`` may also be the decode's split-K results (``kernels.inplace_step.attend``)."""
        if self._inplace is not None:  # the Recent bookkeeping ran on the device, in append
            self._kernels.compress(self._inplace, mass, self.exact_keys, self.exact_values, self.exact_pos, self.sketch,
                                   self.candidate_size, self.budget.replace_rate,
                                   beside=self.overlap and self.followed_on_device)
            return
        # Decode runs this for every layer and token, so the common step (no fold) avoids host reads: the Recent
        # bookkeeping lives on the host, and the only sync is the swap test's count of Vague tokens to pair.
        if not self._all_compressing:
            held = (self.exact_pos >= 0)[:, 0].sum(dim=-1)  # counts are equal across heads
            self.compressing |= ((self.capacity >= 0) & (held > self.capacity)).cpu()
            if not bool(self.compressing.any()):
                self._accumulate(mass)
                return
            self._all_compressing = bool(self.compressing.all())
            self._swapping = (self.compressing.to(self.device) & self.sketch.enabled).view(-1, 1)
        overflow = self.compressing & (self.recent_count > self.recent_size)
        handover = bool(overflow.any())
        if handover or self._recent_start is None:
            # Between handovers the first Recent position stays put: a step adds one to both terms.
            self.recent_count = torch.where(overflow, self.recent_base, self.recent_count)
            self._recent_start = (self.logical_len - self.recent_count).to(self.device).view(-1, 1, 1)
        self._accumulate(mass)
        # Candidate only outgrows its share when Recent hands tokens over (a swap is one for one).
        if handover:
            is_candidate, candidate_scores, _ = self._scores_by_part()
            on = self.compressing.to(self.device)
            excess = torch.where(on, (is_candidate.sum(dim=-1)[:, 0] - self.candidate_size).clamp(min=0), 0)
            if int(excess.max()) > 0:
                self._fold_lowest(candidate_scores, excess)
                self._compact()
        self._swap_back(*self._swap_test())

    def _accumulate(self, mass: torch.Tensor | None) -> None:
        if mass is not None:
            self.scores += mass

    def _scores_by_part(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Candidate slots ``(B, H, E)``, their scores (+inf in the other slots) ``(B, H, E)``, and the Vague
        tokens' scores ``(B, H, N)`` (-inf at exact and padding positions and in rows that never swap)."""
        n = self.logical_len
        pos = self.exact_pos.long()
        filled = pos >= 0
        is_candidate = filled & (pos < self._recent_start)
        # Column N is +inf: the slots that are not Candidates read it, and empty slots write there.
        padded = torch.nn.functional.pad(self.scores, (0, 1), value=float("inf"))
        held = torch.where(filled, pos, n)
        candidate_scores = torch.where(is_candidate, padded.gather(2, held), float("inf"))
        vague_scores = padded.scatter(2, held, float("-inf"))[:, :, :n]
        if self._pad_mask is not None:
            vague_scores[:, :, : self._pad_mask.shape[-1]].masked_fill_(self._pad_mask, float("-inf"))
        if not (self._all_compressing and self._sketch_everywhere):  # some rows never swap
            vague_scores.masked_fill_(~self._swapping.unsqueeze(-1), float("-inf"))
        return is_candidate, candidate_scores, vague_scores

    def _fold_lowest(self, candidate_scores: torch.Tensor, excess: torch.Tensor) -> None:
        """Move each sequence's ``excess`` lowest-scored Candidates into the sketch."""
        k = int(excess.max())
        _, slots = torch.topk(candidate_scores, k, dim=-1, largest=False)  # (B, H, k)
        chosen = torch.arange(k, device=self.device).view(1, 1, -1) < excess.view(-1, 1, 1)
        self._trade(slots, None, chosen.expand_as(slots))

    def _swap_test(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The number of Vague tokens above the lowest Candidate's score x ReplaceRate ``(B, H)``, and the Candidate
        and Vague scores of :meth:`_scores_by_part`."""
        _, candidate_scores, vague_scores = self._scores_by_part()
        if candidate_scores.shape[-1] == 0:  # a budget too small for one exact slot: nothing to swap with
            return vague_scores.new_zeros(vague_scores.shape[:2], dtype=torch.long), candidate_scores, vague_scores
        bar = candidate_scores.min(dim=-1, keepdim=True).values * self.budget.replace_rate
        return (vague_scores > bar).sum(dim=-1), candidate_scores, vague_scores

    def _swap_back(self, above_bar: torch.Tensor, candidate_scores: torch.Tensor, vague_scores: torch.Tensor) -> None:
        """Swap Vague tokens whose score beats the lowest Candidates x ReplaceRate back into the exact store."""
        # Only the Vague tokens above the lowest Candidate's bar can swap, so pairing that many is enough (the
        # Candidates' bars only rise along the pairing); it is 0-2 at most steps, against the store's size.
        k = min(int(above_bar.max()), candidate_scores.shape[-1])
        if k == 0:
            return
        top_vague, vague_pos = torch.topk(vague_scores, k, dim=-1)
        low_cand, cand_slots = torch.topk(candidate_scores, k, dim=-1, largest=False)
        # Padding in either list fails the test by itself: a non-Candidate slot reads +inf, a non-Vague position -inf.
        self._trade(cand_slots, vague_pos, low_cand * self.budget.replace_rate < top_vague)

    def _trade(self, slots: torch.Tensor, vague_pos: torch.Tensor | None, move: torch.Tensor) -> None:
        """The tokens of exact ``slots`` ``(B, H, M)`` enter the sketch where ``move``; with ``vague_pos``, the Vague
        tokens there take their slots (a swap), else the slots empty (a fold; rows without buckets drop them).
        """
        gather = slots.unsqueeze(-1).expand(-1, -1, -1, self.head_dim)
        out_k, out_v = self.exact_keys.gather(2, gather), self.exact_values.gather(2, gather)
        out_pos = self.exact_pos.gather(2, slots)
        if vague_pos is None:
            self.sketch.insert(out_pos.long(), out_k, out_v, (move & self.sketch.enabled.view(-1, 1, 1)).float())
            self.exact_pos = self.exact_pos.scatter(2, slots, torch.where(move, -1, out_pos))
            return
        revived_k, revived_v = self.sketch.swap(vague_pos, out_pos.long(), out_k, out_v, move.float())
        put = move.unsqueeze(-1)
        self.exact_keys = self.exact_keys.scatter(2, gather, torch.where(put, revived_k, out_k))
        self.exact_values = self.exact_values.scatter(2, gather, torch.where(put, revived_v, out_v))
        self.exact_pos = self.exact_pos.scatter(2, slots, torch.where(move, vague_pos.to(torch.int32), out_pos))

    def _compact(self) -> None:
        """Drop empty slots so the exact store holds no more than the largest sequence needs."""
        filled = self.exact_pos >= 0
        keep = int(filled.sum(dim=-1).max())
        if keep == self.exact_pos.shape[-1]:
            return
        order = torch.argsort((~filled).to(torch.int8), dim=-1, stable=True)[:, :, :keep]
        gather = order.unsqueeze(-1).expand(-1, -1, -1, self.head_dim)
        self.exact_keys = self.exact_keys.gather(2, gather)
        self.exact_values = self.exact_values.gather(2, gather)
        self.exact_pos = self.exact_pos.gather(2, order)

    # -- accounting ------------------------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        sketch = self.sketch.nbytes() if self.sketch is not None else 0
        scores = self._inplace.nbytes() if self._inplace is not None else tensor_bytes(self.scores)
        return tensor_bytes(self.exact_keys, self.exact_values, self.exact_pos) + scores + sketch

    def parts(self) -> dict[str, torch.Tensor]:
        """Per-sequence token counts of each part, ``(B,)`` each (for reports and tests)."""
        filled = (self.exact_pos >= 0)[:, 0].sum(-1)
        counts = self._inplace.recent_count if self._inplace is not None else self.recent_count
        recent = torch.minimum(counts.to(filled.device), filled)
        valid = self.logical_len - self.offsets
        return {"recent": recent, "candidate": filled - recent, "vague": valid - filled}


@register("kvreviver")
@dataclass
class KVReviverMethod(Method):
    """KVReviver (arXiv 2512.17917).

    Args:
        estimator: ``"sum"`` (the paper's Count-Sketch) or ``"mean"`` (buckets averaged; an option, measured beside).
        signed_keys: give keys the values' +-1 signs in the sketch (unbiased keys; the paper sums them unsigned).
        combine: how the sketch's rows combine into a Vague token's estimate, ``"median"`` (the paper's) or
            ``"mean"`` (linear: the decode kernel then attends the buckets' logits and rebuilds no token, see
            :mod:`kvreviver_core.kernels.reviver_decode`; an option, measured beside).
        seed: seed of the sketch's hash and sign functions.
        fused: decode attention straight from the compressed store (no revival): ``"auto"`` uses the Triton
            kernel on CUDA, ``True`` also the pure-torch reference elsewhere, ``"reference"`` the reference
            everywhere, ``False`` never (see :mod:`kvreviver_core.kernels`).
        overlap: on the in-place decode step (CUDA), run the cumulative scores' update and Algorithm 3 on a side
            stream beside the rest of the model's step (:mod:`kvreviver_core.kernels.side_stream`); the same results
            either way.
    """

    budget_fields: ClassVar[tuple[str, ...]] = TUNABLE_FIELDS

    estimator: str = "sum"
    signed_keys: bool = False
    combine: str = "median"
    seed: int = 0
    fused: bool | str = "auto"
    overlap: bool = True

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; choose from {', '.join(ESTIMATORS)}")
        if self.combine not in COMBINES:
            raise ValueError(f"unknown row combine {self.combine!r}; choose from {', '.join(COMBINES)}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.signed_keys, bool):
            raise ValueError(f"signed_keys must be true or false, got {self.signed_keys!r}")
        check_fused_option(self.fused)
        if not isinstance(self.overlap, bool):
            raise ValueError(f"overlap must be true or false, got {self.overlap!r}")

    def make_layer(self, layer_idx: int, budget: Budget) -> CompressedLayer:
        return ReviverLayer(layer_idx, budget, estimator=self.estimator, seed=self.seed, fused=self.fused,
                            signed_keys=self.signed_keys, combine=self.combine, overlap=self.overlap)
