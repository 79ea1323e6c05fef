"""VagueSketch against independent references: a naive per-token loop, exactness without collisions, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from kvreviver_core.sketch import VagueSketch


def make_sketch(buckets: int, batch: int = 1, heads: int = 1, dim: int = 8, seed: int = 0, rows: int = 3,
                estimator: str = "sum", dtype=torch.float64, signed_keys: bool = False,
                combine: str = "median") -> VagueSketch:
    return VagueSketch(batch, heads, dim, rows, torch.full((batch,), buckets), torch.zeros(batch, dtype=torch.long),
                       dtype, torch.device("cpu"), seed=seed, estimator=estimator, signed_keys=signed_keys,
                       combine=combine)


def naive_query(sketch: VagueSketch, inserted: dict[int, tuple[torch.Tensor, torch.Tensor]], position: int):
    """Algorithms 1-2 written token by token from the paper, sharing only the hash functions."""
    pos = torch.tensor([[[position]]])
    slot, sign = sketch.slots(pos)
    keys, values = [], []
    for row in range(sketch.rows):
        key_sum = sum((k for p, (k, _) in inserted.items()
                       if int(sketch.slots(torch.tensor([[[p]]]))[0][0, 0, row, 0]) == int(slot[0, 0, row, 0])),
                      torch.zeros(sketch.keys.shape[-1], dtype=sketch.keys.dtype))
        value_sum = torch.zeros(sketch.keys.shape[-1], dtype=sketch.keys.dtype)
        for p, (_, v) in inserted.items():
            s, g = sketch.slots(torch.tensor([[[p]]]))
            if int(s[0, 0, row, 0]) == int(slot[0, 0, row, 0]):
                value_sum = value_sum + v * int(g[0, 0, row, 0])
        keys.append(key_sum)
        values.append(value_sum * int(sign[0, 0, row, 0]))
    if sketch.combine == "mean":
        return torch.stack(keys).mean(dim=0), torch.stack(values).mean(dim=0)
    return torch.stack(keys).median(dim=0).values, torch.stack(values).median(dim=0).values


def test_hashes_are_deterministic_rows_differ_and_signs_are_balanced():
    sketch = make_sketch(64)
    pos = torch.arange(4000).view(1, 1, -1)
    slot_a, sign_a = sketch.slots(pos)
    slot_b, sign_b = make_sketch(64).slots(pos)
    assert torch.equal(slot_a, slot_b) and torch.equal(sign_a, sign_b)
    assert not torch.equal(slot_a[0, 0, 0] % 64, slot_a[0, 0, 1] % 64)
    assert not torch.equal(make_sketch(64, seed=1).slots(pos)[0], slot_a)
    counts = torch.bincount((slot_a[0, 0, 0]), minlength=64).float()
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()
    assert abs(sign_a.double().mean().item()) < 0.05
    assert set(sign_a.unique().tolist()) == {-1, 1}


@pytest.mark.parametrize("combine", ["median", "mean"])
def test_vectorised_insert_and_query_match_the_naive_algorithm(combine):
    torch.manual_seed(0)
    sketch = make_sketch(5, combine=combine)
    positions = list(range(3, 40, 2))
    keys, values = torch.randn(len(positions), 8, dtype=torch.float64), torch.randn(len(positions), 8, dtype=torch.float64)
    pos = torch.tensor(positions).view(1, 1, -1)
    sketch.insert(pos, keys.view(1, 1, -1, 8), values.view(1, 1, -1, 8), torch.ones(1, 1, len(positions)))
    got_k, got_v = sketch.query(pos)
    inserted = {p: (keys[i], values[i]) for i, p in enumerate(positions)}
    for i, p in enumerate(positions):
        want_k, want_v = naive_query(sketch, inserted, p)
        torch.testing.assert_close(got_k[0, 0, i], want_k)
        torch.testing.assert_close(got_v[0, 0, i], want_v)


@pytest.mark.parametrize("combine", ["median", "mean"])
def test_without_collisions_query_is_exact_and_delete_restores_the_previous_state(combine):
    torch.manual_seed(1)
    sketch = make_sketch(4096, batch=2, heads=3, combine=combine)
    pos = torch.tensor([5, 77, 901, 1500]).expand(2, 3, 4)
    slot, _ = sketch.slots(pos)
    assert all(len(set(slot[b, h, r].tolist())) == 4 for b in range(2) for h in range(3) for r in range(3))
    first_k, first_v = torch.randn(2, 3, 4, 8, dtype=torch.float64), torch.randn(2, 3, 4, 8, dtype=torch.float64)
    sketch.insert(pos, first_k, first_v, torch.ones(2, 3, 4))
    before = (sketch.keys.clone(), sketch.values.clone())
    got_k, got_v = sketch.query(pos)
    torch.testing.assert_close(got_k, first_k)
    torch.testing.assert_close(got_v, first_v)

    extra = torch.tensor([2222, 3333]).expand(2, 3, 2)
    extra_k, extra_v = torch.randn(2, 3, 2, 8, dtype=torch.float64), torch.randn(2, 3, 2, 8, dtype=torch.float64)
    sketch.insert(extra, extra_k, extra_v, torch.ones(2, 3, 2))
    estimate_k, estimate_v = sketch.query(extra)
    sketch.delete(extra, estimate_k, estimate_v, torch.ones(2, 3, 2))
    torch.testing.assert_close(sketch.keys, before[0])
    torch.testing.assert_close(sketch.values, before[1])


@pytest.mark.parametrize("estimator", ["sum", "mean"])
def test_swap_equals_query_then_delete_then_insert(estimator):
    torch.manual_seed(4)
    swapped, separate = (make_sketch(5, batch=2, heads=2, estimator=estimator, signed_keys=True) for _ in range(2))
    held = torch.randperm(60)[:15].expand(2, 2, 15)
    keys, values = torch.randn(2, 2, 15, 8, dtype=torch.float64), torch.randn(2, 2, 15, 8, dtype=torch.float64)
    for sketch in (swapped, separate):
        sketch.insert(held, keys, values, torch.ones(2, 2, 15))
    leaving, entering = held[:, :, :4], torch.tensor([61, 62, 63, 64]).expand(2, 2, 4)
    new_k, new_v = torch.randn(2, 2, 4, 8, dtype=torch.float64), torch.randn(2, 2, 4, 8, dtype=torch.float64)
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0]).expand(2, 2, 4)  # the third pair does not trade

    got_k, got_v = swapped.swap(leaving, entering, new_k, new_v, weight)
    want_k, want_v = separate.query(leaving)
    separate.delete(leaving, want_k, want_v, weight)
    separate.insert(entering, new_k, new_v, weight)
    torch.testing.assert_close(got_k, want_k)
    torch.testing.assert_close(got_v, want_v)
    torch.testing.assert_close(swapped.keys, separate.keys)
    torch.testing.assert_close(swapped.values, separate.values)
    if estimator == "mean":
        assert torch.equal(swapped.counts, separate.counts)
    assert not torch.equal(swapped.values, make_sketch(5, batch=2, heads=2).values)  # the sketch is not empty


def test_weight_zero_entries_are_not_inserted():
    sketch = make_sketch(16)
    pos = torch.arange(6).view(1, 1, -1)
    sketch.insert(pos, torch.ones(1, 1, 6, 8, dtype=torch.float64), torch.ones(1, 1, 6, 8, dtype=torch.float64),
                  torch.zeros(1, 1, 6))
    assert sketch.keys.abs().sum() == 0 and sketch.values.abs().sum() == 0


def test_mean_estimator_divides_by_bucket_occupancy():
    sketch = make_sketch(1, estimator="mean")  # one bucket per row: every token collides
    pos = torch.arange(4).view(1, 1, -1)
    keys = torch.arange(4, dtype=torch.float64).view(1, 1, 4, 1).expand(1, 1, 4, 8)
    sketch.insert(pos, keys, keys, torch.ones(1, 1, 4))
    got_k, _ = sketch.query(pos)
    torch.testing.assert_close(got_k, torch.full_like(got_k, 1.5))  # mean of 0..3 in every row


def test_value_estimate_is_unbiased_over_hash_seeds():
    """E[v_hat] = v: average the estimate of fixed tokens over independent hash/sign functions."""
    torch.manual_seed(2)
    tokens, dim, seeds = 60, 16, 400
    pos = torch.arange(tokens).view(1, 1, -1)
    keys, values = torch.randn(1, 1, tokens, dim, dtype=torch.float64), torch.randn(1, 1, tokens, dim, dtype=torch.float64)
    errors = []
    for seed in range(seeds):
        sketch = make_sketch(6, dim=dim, seed=seed)
        sketch.insert(pos, keys, values, torch.ones(1, 1, tokens))
        errors.append(sketch.query(pos)[1] - values)
    errors = torch.stack(errors)  # (seeds, 1, 1, tokens, dim)
    z = errors.mean(0) / (errors.std(0) / math.sqrt(seeds))
    assert (z.abs() < 4).double().mean() > 0.99  # |z| < 4 for nearly every coordinate if unbiased
    key_sketch = make_sketch(6, dim=dim)
    key_sketch.insert(pos, keys + 3.0, values, torch.ones(1, 1, tokens))
    # Keys are summed without signs (the paper): with a non-zero mean they are biased, which this test can see.
    assert (key_sketch.query(pos)[0] - (keys + 3.0)).mean() > 1.0
    key_errors = []
    for seed in range(seeds // 4):
        signed = make_sketch(6, dim=dim, seed=seed, signed_keys=True)
        signed.insert(pos, keys + 3.0, values, torch.ones(1, 1, tokens))
        key_errors.append(signed.query(pos)[0] - (keys + 3.0))
    assert abs(torch.stack(key_errors).mean().item()) < 0.1  # signed keys remove that bias


@pytest.mark.parametrize("part", ["keys", "values"])
def test_error_variance_within_the_paper_bound(part):
    """P(Var > a*pi/N * sigma^2) < exp(-a/N) on Gaussian data, N = r*b slots, a = tokens inserted."""
    rows, buckets, tokens, dim, trials = 3, 16, 200, 32, 60
    n_slots = rows * buckets
    bound = tokens * math.pi / n_slots
    pos = torch.arange(tokens).view(1, 1, -1)
    exceed = 0
    for trial in range(trials):
        gen = torch.Generator().manual_seed(trial)
        keys = torch.randn(1, 1, tokens, dim, generator=gen, dtype=torch.float64)
        values = torch.randn(1, 1, tokens, dim, generator=gen, dtype=torch.float64)
        sketch = make_sketch(buckets, dim=dim, seed=trial)
        sketch.insert(pos, keys, values, torch.ones(1, 1, tokens))
        k_hat, v_hat = sketch.query(pos)
        error = (k_hat - keys) if part == "keys" else (v_hat - values)
        exceed += int(error.pow(2).mean().item() > bound)
    assert exceed / trials < math.exp(-tokens / n_slots)
