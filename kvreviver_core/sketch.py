"""VagueSketch: KVReviver's Count-Sketch of keys and values (paper Algorithms 1 and 2).

One sketch per layer holds, for every sequence and KV head, ``r`` rows of ``b`` buckets. Each bucket is one key
vector and one value vector. Inserting token ``j`` adds its key, and its value times a sign ``g_i(j)``, at bucket
``h_i(j)`` of row ``i``. A query takes the median over rows of the bucket keys, and of the bucket values times
``g_i(j)``. Delete subtracts what insert added.

Hashes are deterministic functions of (row, logical token position, seed), computed on the tensors' device, so a
sequence gets the same buckets whether it runs alone or left-padded in a batch.

Estimators:
* ``"sum"`` is the paper's: buckets hold sums.
* ``"mean"`` divides each bucket by the number of tokens it holds before the median.
Keys are summed without signs in the paper. ``signed_keys=True`` gives keys the same +-1 signs as values, which
makes the key estimate unbiased too: colliding keys no longer add up coherently. Both are options measured beside
the faithful sketch, never silent replacements.

Row combines:
* ``"median"`` is the paper's (and Count-Sketch's): the element-wise median of the r row estimates.
* ``"mean"`` averages them. The estimate is then linear in the buckets, so a decode step can attend the Vague
  tokens through the r x b buckets' logits, without rebuilding any token (``kernels/reviver_decode.py``). An option
  measured beside the median, like the two above.
"""

from __future__ import annotations

from typing import Literal

import torch

from kvreviver_core.ops import accumulation_dtype, add_at

Estimator = Literal["sum", "mean"]
ESTIMATORS: tuple[str, ...] = ("sum", "mean")
Combine = Literal["median", "mean"]
COMBINES: tuple[str, ...] = ("median", "mean")

_MIX_1 = 0x5851F42D4C957F2D  # odd 64-bit multipliers (PCG / splitmix family)
_MIX_2 = 0x14057B7EF767814F


def _wrap64(x: int) -> int:
    return (x + 2**63) % 2**64 - 2**63


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit avalanche on int64 tensors (multiplications wrap around)."""
    x = x ^ (x >> 31)
    x = x * _wrap64(_MIX_1)
    x = x ^ (x >> 29)
    x = x * _wrap64(_MIX_2)
    return x ^ (x >> 32)


def median_of_rows(stacked: torch.Tensor) -> torch.Tensor:
    """Median over dim 2 of ``(B, H, r, M, D)``; min/max form for r=3, which is far faster than torch.median."""
    r = stacked.shape[2]
    if r == 1:
        return stacked[:, :, 0]
    if r == 3:
        a, b, c = stacked.unbind(2)
        return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))
    return stacked.median(dim=2).values


def combine_rows(stacked: torch.Tensor, combine: Combine) -> torch.Tensor:
    """The r row estimates ``(B, H, r, M, D)`` combined over dim 2: their median, or their mean (summed in fp32,
    or the storage dtype if wider, in row order and divided once, as the kernels do)."""
    if combine == "median":
        return median_of_rows(stacked)
    wide = accumulation_dtype(stacked.dtype)
    total = stacked[:, :, 0].to(wide)
    for row in range(1, stacked.shape[2]):
        total = total + stacked[:, :, row].to(wide)
    return (total / stacked.shape[2]).to(stacked.dtype)


class VagueSketch:
    """Batched Count-Sketch of K/V for one layer.

    Args:
        batch, heads, head_dim: shapes of the layer's cache.
        rows: r.
        buckets: per-sequence bucket count b, a ``(batch,)`` long tensor (sequences may have different budgets).
        offsets: per-sequence position offset ``(batch,)`` (left padding), so hashes use logical positions.
        seed: hash seed; a different seed gives independent hash and sign functions.
        estimator, signed_keys, combine: the variants of the module docstring.
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        head_dim: int,
        rows: int,
        buckets: torch.Tensor,
        offsets: torch.Tensor,
        dtype: torch.dtype,
        device: torch.device,
        seed: int = 0,
        estimator: Estimator = "sum",
        signed_keys: bool = False,
        combine: Combine = "median",
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown sketch estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
        if combine not in COMBINES:
            raise ValueError(f"unknown row combine {combine!r}; choose from {', '.join(COMBINES)}")
        self.rows = rows
        self.buckets = buckets.to(device=device, dtype=torch.long)
        # Zero when no sequence of the batch has a bucket (a Vague share too small for r slots): nothing is held.
        self.width = int(self.buckets.max().item()) if self.buckets.numel() else 0
        self.offsets = offsets.to(device=device, dtype=torch.long)
        self.seed = seed
        self.estimator = estimator
        self.signed_keys = signed_keys
        self.combine = combine
        # The parts of the hash that do not depend on the position, built once: a decode step's cost is its op count.
        # (1, 1, r, 1) int64, contiguous: the Triton kernels read the same r terms.
        row = torch.arange(rows, device=device, dtype=torch.long).view(1, 1, -1, 1)
        self.row_terms = row * 0x632BE5AB + (seed * 0x27D4EB2F + 1)
        self._row_starts = row * self.width
        self._divisors = self.buckets.clamp(min=1).view(-1, 1, 1, 1)
        shape = (batch, heads, rows * self.width, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.counts = torch.zeros(shape[:3], dtype=torch.int32, device=device) if estimator == "mean" else None

    @property
    def enabled(self) -> torch.Tensor:
        """``(batch,)`` bool: sequences whose sketch has at least one bucket per row."""
        return self.buckets > 0

    def nbytes(self) -> int:
        total = self.keys.numel() * self.keys.element_size() * 2
        if self.counts is not None:
            total += self.counts.numel() * self.counts.element_size()
        return total

    def slots(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat slot index ``row * width + h_row(pos)`` and sign ``g_row(pos)``, each ``(B, H, r, M)``.

        Args:
            positions: ``(B, H, M)`` physical positions in the cache (long).
        """
        logical = positions - self.offsets.view(-1, 1, 1)
        mixed = _mix(logical.unsqueeze(2) * 0x9E3779B1 + self.row_terms)
        bucket = torch.remainder(mixed, self._divisors)
        sign = 1 - 2 * ((mixed >> 40) & 1)
        return bucket + self._row_starts, sign

    def _scatter(self, slot: torch.Tensor, sign: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 weight: torch.Tensor) -> None:
        """Add ``weight``-scaled keys and signed values at the rows' buckets ``(slot, sign)`` of :meth:`slots`."""
        if self.width == 0:
            return
        b, h, r, m = slot.shape
        d = keys.shape[-1]
        w = weight.to(keys.dtype).unsqueeze(2).unsqueeze(-1)  # (B, H, 1, M, 1)
        signed_w = sign.to(values.dtype).unsqueeze(-1) * w  # (B, H, r, M, 1)
        key_w = signed_w if self.signed_keys else w
        key_src = (keys.unsqueeze(2) * key_w).expand(b, h, r, m, d).reshape(b, h, r * m, d)
        value_src = (values.unsqueeze(2) * signed_w).reshape(b, h, r * m, d)
        index = slot.reshape(b, h, r * m)
        add_at(self.keys, index, key_src)
        add_at(self.values, index, value_src)
        if self.counts is not None:
            ones = weight.to(torch.int32).unsqueeze(2).expand(b, h, r, m).reshape(b, h, r * m)
            add_at(self.counts, index, ones)

    def insert(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> None:
        """Algorithm 1, batched. ``weight`` ``(B, H, M)`` is 1 for tokens to insert and 0 for ignored entries.

        Args:
            positions: ``(B, H, M)`` long.
            keys, values: ``(B, H, M, D)``.
            weight: ``(B, H, M)`` 0/1.
        """
        self._scatter(*self.slots(positions), keys, values, weight)

    def delete(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> None:
        """Subtract what :meth:`insert` added for these tokens (same arguments)."""
        self._scatter(*self.slots(positions), keys, values, -weight)

    def query(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 2, batched: the rows' median (or mean, ``combine``). ``positions`` ``(B, H, M)`` -> keys, values ``(B, H, M, D)``."""
        if self.width == 0:
            empty = positions.new_zeros(*positions.shape, self.keys.shape[-1], dtype=self.keys.dtype)
            return empty, empty.clone()
        return self._estimate(*self.slots(positions))

    def _estimate(self, slot: torch.Tensor, sign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, r, m = slot.shape
        d = self.keys.shape[-1]
        index = slot.reshape(b, h, r * m, 1).expand(b, h, r * m, d)
        row_sign = sign.to(self.values.dtype).unsqueeze(-1)
        keys = self.keys.gather(2, index).view(b, h, r, m, d)
        if self.signed_keys:
            keys = keys * row_sign
        values = self.values.gather(2, index).view(b, h, r, m, d) * row_sign
        if self.counts is not None:
            count = self.counts.gather(2, slot.reshape(b, h, r * m)).view(b, h, r, m, 1).clamp(min=1)
            keys = keys / count.to(keys.dtype)
            values = values / count.to(values.dtype)
        return combine_rows(keys, self.combine), combine_rows(values, self.combine)

    def swap(self, leaving: torch.Tensor, entering: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
             weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trade tokens with the exact store: ``leaving`` is queried and deleted, ``entering`` inserted.

        One hash of both position sets, where query + delete + insert would hash three times (a decode step's
        launches are what it costs).

        Args:
            leaving, entering: ``(B, H, M)`` long positions; keys, values: ``(B, H, M, D)`` of ``entering``;
            weight: ``(B, H, M)`` 0/1, the pairs that trade.

        Returns:
            the estimates of ``leaving`` ``(B, H, M, D)`` each, read before anything changes.
        """
        if self.width == 0:
            return self.query(leaving)
        m = leaving.shape[-1]
        slot, sign = self.slots(torch.cat([leaving, entering], dim=-1))  # (B, H, r, 2M): leaving first
        out_keys, out_values = self._estimate(slot[..., :m], sign[..., :m])
        self._scatter(slot, sign, torch.cat([out_keys, keys], dim=2), torch.cat([out_values, values], dim=2),
                      torch.cat([-weight, weight], dim=-1))
        return out_keys, out_values

    def select_batch(self, indices: torch.Tensor) -> None:
        self.keys = self.keys[indices]
        self.values = self.values[indices]
        self.buckets = self.buckets[indices]
        self._divisors = self._divisors[indices]
        self.offsets = self.offsets[indices]
        if self.counts is not None:
            self.counts = self.counts[indices]
