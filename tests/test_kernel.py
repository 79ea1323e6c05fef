"""The fused KVReviver decode attention: the torch reference against revive() + exact attention (CPU), the Triton
kernel against the reference (GPU only), and the layer's fused path against its unfused one inside ``generate``."""

from __future__ import annotations

import copy

import pytest
import torch

from kvreviver_core.attention import combined_mask, scored_attention
from kvreviver_core.budget import Budget
from kvreviver_core.cache import make_cache
from kvreviver_core.generation import cache_kwargs
from kvreviver_core.kernels import decode_backend, reviver_decode_reference, triton_available
from kvreviver_core.kernels.reference import exact_position_map
from kvreviver_core.methods.reviver import ReviverLayer
from kvreviver_core.sketch import VagueSketch
from tests.conftest import tiny_llama

SPLITS = {"paper": (0.1, 0.45, 0.45), "wide-vague": (0.4, 0.3, 0.3), "no-vague": (0.0, 0.5, 0.5)}


def compressed_layer(estimator: str, split, fraction: float = 0.2, batch: int = 3, heads: int = 2, head_dim: int = 16,
                     prompt: int = 160, pads=(0, 13, 40), steps: int = 3, seed: int = 0, device="cpu",
                     dtype=torch.float32, rows: int = 3, signed_keys: bool = False,
                     combine: str = "median") -> tuple[ReviverLayer, torch.Tensor]:
    """A real ReviverLayer after a left-padded prefill and ``steps`` unfused decode steps; and its padding mask."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    layer = ReviverLayer(0, Budget(fraction, split=split, sketch_rows=rows), estimator=estimator, seed=seed, fused=False,
                         signed_keys=signed_keys, combine=combine)
    layer.update(rand(batch, heads, prompt, head_dim), rand(batch, heads, prompt, head_dim))
    valid = torch.arange(prompt).view(1, -1) >= torch.tensor(pads[:batch]).view(-1, 1)
    scores = torch.rand(batch, heads, prompt, generator=gen).to(device) * valid.to(device).unsqueeze(1)
    layer.observe(scores, valid.to(device))
    for _ in range(steps):
        layer.update(rand(batch, heads, 1, head_dim), rand(batch, heads, 1, head_dim))
        valid = torch.cat([valid, torch.ones(batch, 1, dtype=torch.bool)], dim=1)
        layer.observe(torch.rand(batch, heads, layer.logical_len, generator=gen).to(device) * 0.3, valid.to(device))
    return layer, valid.to(device)


def unfused_step(layer: ReviverLayer, query, new_k, new_v, valid, scaling):
    """The existing path: update() revives the full K/V, then exact attention with its column sums."""
    keys, values = layer.update(new_k, new_v)
    valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
    mask = combined_mask(valid.view(valid.shape[0], 1, 1, -1), layer.slot_mask(), 1, keys.shape[2], keys.device)
    out, scores = scored_attention(query, keys, values, mask, scaling, None)
    return out, scores, mask[:, 0, -1, :]


@pytest.mark.parametrize("estimator,split,combine", [("sum", "paper", "median"), ("mean", "paper", "median"),
                                                     ("sum", "wide-vague", "median"), ("sum", "paper", "mean")])
def test_reference_equals_revive_then_exact_attention(estimator, split, combine):
    # fp64, which both paths keep: the "sum" buckets add up hundreds of keys, so in fp32 two summation orders (the
    # CPU's matmul kernels differ by instruction set) part by up to ~1e-4 in the output.
    f64 = torch.float64
    layer, valid = compressed_layer(estimator, SPLITS[split], fraction=0.3, prompt=400, combine=combine, dtype=f64)
    parts = layer.parts()
    assert int(parts["candidate"].min()) > 0 and int(parts["recent"].min()) > 0 and int(parts["vague"].min()) > 0
    assert bool(layer.sketch.enabled.all())
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(3, 4, 1, 16, generator=gen, dtype=f64) * 2  # GQA: 2 query heads per KV head
    new_k, new_v = (torch.randn(3, 2, 1, 16, generator=gen, dtype=f64) for _ in range(2))
    out, scores, key_valid = unfused_step(layer, query, new_k, new_v, valid, 0.25)

    ref_out, mass = reviver_decode_reference(query, layer.exact_keys, layer.exact_values, layer.exact_pos,
                                             layer.sketch, key_valid, 0.25)
    torch.testing.assert_close(ref_out, out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mass, scores, rtol=1e-5, atol=1e-6)  # both fp32
    assert torch.allclose(mass.sum(-1), torch.full_like(mass[..., 0], 2.0), atol=1e-5)  # G=2 heads, each sums to 1
    assert float(mass[1, :, :13].abs().max()) == 0.0  # padding gets no mass


@pytest.mark.parametrize("sketch", ["none", "no-buckets"])
def test_reference_without_sketch_attends_each_heads_exact_slots_only(sketch):
    """No sketch, or one without buckets (Vague share 0): a head attends only the tokens it holds itself.

    (The unfused path masks per sequence, so there a head also sees zero K/V where another head holds a token.)
    """
    layer, valid = compressed_layer("sum", SPLITS["no-vague"], batch=2, pads=(0, 5))
    assert not bool(layer.sketch.enabled.any())
    key_valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
    layer.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
    query = torch.randn(2, 2, 1, 16)
    out, mass = reviver_decode_reference(query, layer.exact_keys, layer.exact_values, layer.exact_pos,
                                         None if sketch == "none" else layer.sketch, key_valid, 0.3)
    held = exact_position_map(layer.exact_pos, key_valid.shape[1])
    assert float(mass[~held].abs().max()) == 0.0 and torch.allclose(mass.sum(-1), torch.ones(2, 2))
    logits = torch.einsum("bhd,bhed->bhe", query[:, :, 0], layer.exact_keys) * 0.3
    probs = torch.softmax(logits.masked_fill(layer.exact_pos < 0, float("-inf")), dim=-1)
    torch.testing.assert_close(out[:, 0], torch.einsum("bhe,bhed->bhd", probs, layer.exact_values))


def test_fused_update_returns_views_not_revived_kv():
    layer, _ = compressed_layer("sum", SPLITS["paper"])
    layer.fused = "reference"
    keys, values = layer.update(torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16))
    assert keys.shape[2] == layer.logical_len and keys.stride(2) == 0 and values.stride(2) == 0
    assert layer.fused_attention(torch.randn(3, 4, 1, 16), keys, values, None, 0.25) is not None
    assert layer.fused_attention(torch.randn(3, 4, 1, 16), keys, values, None, 0.25) is None  # one call per step


def test_fused_option_is_checked_and_auto_keeps_the_unfused_path_on_cpu():
    model = tiny_llama()
    with pytest.raises(ValueError, match="fused must be one of"):
        make_cache("kvreviver", 0.2, model=model, fused="yes")
    assert decode_backend("auto", torch.zeros(1, 1, 1, 4), None) is None
    assert decode_backend(True, torch.zeros(1, 1, 1, 4), None) is reviver_decode_reference
    assert decode_backend(False, torch.zeros(1, 1, 1, 4), None) is None


def generate_with(model, fused, device, prompts, new_tokens: int = 8, **options):
    """Greedy ``generate`` with a kvreviver cache: the new ids and the cache."""
    cache = make_cache("kvreviver", Budget(0.25, split=SPLITS["wide-vague"]), model=model, fused=fused, **options)
    out = model.generate(**prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=0, **cache_kwargs(model, cache))
    return out[:, prompts["input_ids"].shape[1]:], cache


def padded_prompts(lengths, vocab: int, device, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[row, width - n:] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def assert_same_generation(model, fused_a, fused_b, device, lengths=(300, 200), **options):
    prompts = padded_prompts(lengths, model.config.vocab_size, device)
    with torch.no_grad():
        ids_a, cache_a = generate_with(model, fused_a, device, prompts, **options)
        ids_b, cache_b = generate_with(model, fused_b, device, prompts, **options)
    assert ids_a.tolist() == ids_b.tolist()
    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers):
        assert bool(layer_a.sketch.enabled.all()) and int(layer_a.parts()["vague"].min()) > 0  # Vague part in use
        assert torch.equal(layer_a.exact_map(), layer_b.exact_map())  # the same tokens, in whichever slots
        torch.testing.assert_close(layer_a.scores, layer_b.scores, rtol=1e-4, atol=1e-5)


def test_fused_reference_in_generate_matches_unfused_path():
    assert_same_generation(tiny_llama(), "reference", False, "cpu")


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs a CUDA GPU and Triton")


def planned_store(device, **options) -> tuple[int, int]:
    """The sketch buckets per row and the exact slots a layer plans for one 400-token prompt at budget 0.25."""
    layer = ReviverLayer(0, Budget(0.25, split=SPLITS["wide-vague"]), **options)
    layer.update(torch.randn(1, 2, 400, 16, device=device), torch.randn(1, 2, 400, 16, device=device))
    layer.observe(torch.rand(1, 2, 400, device=device), torch.ones(1, 400, dtype=torch.bool, device=device))
    return layer.sketch.width, layer.exact_pos.shape[-1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, gpu])])
def test_the_budget_is_the_devices_whichever_decode_path_runs(device):
    """The store one device plans does not depend on ``fused``, so its paths compare on the same tokens. The
    linear combine's bucket order takes budget only on a device that runs the kernel (CUDA): fewer buckets there."""
    plans = {(fused, combine): planned_store(device, fused=fused, combine=combine)
             for fused in (True, "reference", False) for combine in ("median", "mean")}
    for combine in ("median", "mean"):
        assert len({plan for (_, c), plan in plans.items() if c == combine}) == 1, plans
    median, mean = plans[(True, "median")], plans[(True, "mean")]
    if device == "cpu":
        assert mean == median
    else:
        assert mean[0] < median[0], plans


def random_store(batch, kv_heads, group, head_dim, length, slots, rows, estimator, dtype, seed, buckets, pads,
                 signed_keys=False, combine="median"):
    """Random exact store and sketch (filled through VagueSketch.insert) on the GPU, with padding and empty slots."""
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda")
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dev, dtype)  # noqa: E731
    offsets = torch.tensor(pads, device=dev)
    sketch = VagueSketch(batch, kv_heads, head_dim, rows, torch.tensor(buckets), offsets, dtype, dev, seed=seed,
                         estimator=estimator, signed_keys=signed_keys, combine=combine)
    folded = torch.randint(0, length, (batch, kv_heads, 4 * length), generator=gen).to(dev)
    sketch.insert(folded, rand(batch, kv_heads, 4 * length, head_dim) * 0.3,
                  rand(batch, kv_heads, 4 * length, head_dim) * 0.3, torch.ones(folded.shape, device=dev))
    pos = torch.stack([torch.stack([torch.randperm(length, generator=gen)[:slots] for _ in range(kv_heads)])
                       for _ in range(batch)]).int().to(dev)
    pos[:, :, -7:] = -1  # empty slots
    valid = torch.arange(length, device=dev).view(1, -1) >= offsets.view(-1, 1)
    query = rand(batch, kv_heads * group, 1, head_dim)
    return query, rand(batch, kv_heads, slots, head_dim), rand(batch, kv_heads, slots, head_dim), pos, sketch, valid


KERNEL_CASES = [
    # batch, kv_heads, group, head_dim, length, slots, rows, estimator, dtype, buckets, pads[, sketch options]
    (1, 32, 1, 128, 8193, 760, 3, "sum", torch.bfloat16, (25,), (0,)),
    (3, 4, 4, 64, 5000, 300, 3, "sum", torch.bfloat16, (40, 0, 7), (0, 900, 4000)),
    (3, 4, 4, 64, 5000, 300, 3, "mean", torch.bfloat16, (40, 3, 7), (0, 900, 4000)),
    (2, 3, 3, 64, 1500, 200, 1, "sum", torch.float32, (30, 11), (0, 100)),
    (2, 8, 2, 128, 3000, 2999, 3, "mean", torch.float32, (5, 9), (10, 0)),
    (2, 4, 2, 128, 4000, 400, 3, "sum", torch.bfloat16, (30, 12), (0, 333), {"signed_keys": True}),
    (2, 4, 2, 64, 2000, 100, 3, "mean", torch.float32, (20, 6), (50, 0), {"signed_keys": True}),
    # A KV group of one query head with padded rows: the slots at padded positions are masked.
    (2, 4, 1, 64, 3000, 400, 3, "sum", torch.bfloat16, (30, 12), (0, 333)),
    # The linear combine: Vague tokens through the buckets' logits and weights.
    (1, 32, 1, 128, 8193, 760, 3, "sum", torch.bfloat16, (25,), (0,), {"combine": "mean"}),
    (2, 4, 1, 64, 3000, 400, 3, "mean", torch.float32, (30, 12), (0, 333), {"combine": "mean"}),
    (3, 4, 4, 64, 5000, 300, 3, "mean", torch.float32, (40, 0, 7), (0, 900, 4000), {"combine": "mean"}),
    (2, 3, 3, 64, 1500, 200, 1, "sum", torch.float32, (30, 11), (0, 100), {"combine": "mean"}),
    (2, 4, 2, 128, 4000, 400, 3, "sum", torch.float32, (30, 12), (0, 333), {"combine": "mean", "signed_keys": True}),
]


def case_id(c) -> str:
    options = "".join(f"-{k}={v}" for k, v in (c[11] if len(c) > 11 else {}).items())
    return f"B{c[0]}-Hkv{c[1]}-G{c[2]}-D{c[3]}-L{c[4]}-r{c[6]}-{c[7]}-{str(c[8])[6:]}{options}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", KERNEL_CASES, ids=case_id)
def test_kernel_matches_reference(case):
    from kvreviver_core.kernels.reviver_decode import reviver_decode_triton

    batch, kv_heads, group, head_dim, length, slots, rows, estimator, dtype, buckets, pads = case[:11]
    for seed in range(3):  # fresh inputs each time: the kernel must compute the same function on any input
        args = random_store(batch, kv_heads, group, head_dim, length, slots, rows, estimator, dtype, seed, buckets, pads,
                            **(case[11] if len(case) > 11 else {}))
        out, mass = reviver_decode_triton(*args, head_dim**-0.5)
        assert torch.isfinite(out).all() and torch.isfinite(mass).all()
        # Reference in fp32 on the same (upcast) store; the bf16 reference itself rounds its logits to bf16.
        gold_out, gold_mass = reviver_decode_reference(*upcast(args), head_dim**-0.5)
        rel = float((out.float() - gold_out).norm() / gold_out.norm())
        mass_err = float((mass - gold_mass).abs().max())
        same_dtype_out, _ = reviver_decode_reference(*args, head_dim**-0.5)
        ref_rel = float((same_dtype_out.float() - gold_out).norm() / gold_out.norm())
        print(f"{case_id(case)} seed {seed}: kernel vs fp32 reference: output rel err {rel:.2e}, mass max "
              f"abs err {mass_err:.2e}, mass total {float(mass.sum()):.3f} (expected {batch * kv_heads * group}); "
              f"{str(dtype)[6:]} reference vs fp32 reference: output rel err {ref_rel:.2e}")
        tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert rel < tolerance and mass_err < tolerance
        torch.testing.assert_close(mass.sum(-1), torch.full_like(mass[..., 0], float(group)), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", [c for c in KERNEL_CASES if len(c) > 11 and c[11].get("combine") == "mean"],
                         ids=case_id)
def test_linear_kernel_through_the_bucket_order_matches_reference(case):
    """The in-place step sums the bucket weights through the positions' bucket order (the first ones; the later
    ones one by one, as decode appends them): the same attention as the reference."""
    from kvreviver_core.kernels import reviver_decode as rd

    batch, kv_heads, group, head_dim, length, slots, rows, estimator, dtype, buckets, pads = case[:11]
    args = random_store(batch, kv_heads, group, head_dim, length, slots, rows, estimator, dtype, 0, buckets, pads,
                        **case[11])
    query, keys, values, pos, sketch, valid = args
    gold_out, gold_mass = reviver_decode_reference(*upcast(args), head_dim**-0.5)
    part, codes = rd.part_map(pos, valid), rd.slot_codes(sketch, length)
    for listed in (length, length - 37):
        out, mass = rd.decode_attention(query, keys, values, pos, sketch, part, codes,
                                        torch.full((1,), length, device="cuda"), length, head_dim**-0.5,
                                        order=rd.bucket_order(codes, listed, sketch.width))
        rel = float((out.float() - gold_out).norm() / gold_out.norm())
        mass_err = float((mass - gold_mass).abs().max())
        print(f"{case_id(case)}, {listed} positions ordered: output rel err {rel:.2e}, mass max abs err {mass_err:.2e}")
        tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert rel < tolerance and mass_err < tolerance


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_bucket_order_runs_bound_each_buckets_entries():
    """Each bucket's run in the order holds exactly that bucket's positions (counted apart with bincount), and
    ``runs`` says where it starts and ends, also for buckets no position hashes to and for a row's unused slots."""
    from kvreviver_core.kernels import reviver_decode as rd

    gen = torch.Generator().manual_seed(3)
    width, rows, length = 11, 3, 500
    buckets = torch.tensor([7, 11])  # the first sequence leaves 4 slots of each row empty
    bucket = torch.stack([torch.randint(0, int(n), (rows, length + 20), generator=gen) for n in buckets])
    slot = bucket + torch.arange(rows).view(1, rows, 1) * width
    codes = (slot * 2 + torch.randint(0, 2, slot.shape, generator=gen)).to(torch.int32)
    order = rd.bucket_order(codes, length, width)
    assert order.runs.shape == (2, rows, width + 1) and order.runs.dtype == torch.int32
    for b in range(2):
        for row in range(rows):
            counts = torch.bincount(bucket[b, row, :length], minlength=width)
            starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            assert order.runs[b, row].tolist() == starts.tolist()
            for k in range(width):
                run = slice(int(starts[k]), int(starts[k + 1]))
                positions = order.positions[b, row, run].long()
                assert (bucket[b, row, positions] == k).all()
                assert torch.equal(order.codes[b, row, run], codes[b, row, positions])
                assert positions.tolist() == sorted(positions.tolist())  # stable: by position within a bucket


def upcast(args):
    """The same decode inputs in fp32 (the sketch copied with fp32 buckets)."""
    query, keys, values, pos, sketch, valid = args
    sketch32 = copy.copy(sketch)
    sketch32.keys, sketch32.values = sketch.keys.float(), sketch.values.float()
    return query.float(), keys.float(), values.float(), pos, sketch32, valid


@pytest.mark.gpu
@gpu
def test_kernel_on_a_real_layer_matches_revive_then_exact_attention():
    from kvreviver_core.kernels.reviver_decode import reviver_decode_triton

    layer, valid = compressed_layer("sum", SPLITS["paper"], fraction=0.1, batch=2, heads=8, head_dim=128,
                                    prompt=4096, pads=(0, 1000), device="cuda", dtype=torch.float32)
    query = torch.randn(2, 16, 1, 128, device="cuda")
    new_k, new_v = torch.randn(2, 8, 1, 128, device="cuda"), torch.randn(2, 8, 1, 128, device="cuda")
    out, scores, key_valid = unfused_step(layer, query, new_k, new_v, valid, 128**-0.5)
    fused_out, mass = reviver_decode_triton(query, layer.exact_keys, layer.exact_values, layer.exact_pos,
                                            layer.sketch, key_valid, 128**-0.5)
    rel = float((fused_out - out).norm() / out.norm())
    print(f"real layer: output rel err {rel:.2e} (max abs {float((fused_out - out).abs().max()):.2e}), "
          f"scores max abs err {float((mass - scores).abs().max()):.2e}")
    # fp32 on both sides; the "sum" buckets hold ~300 keys each, so logits reach tens and single elements of the
    # output cancel down from values of ~17: compare the whole output's relative error, and the masses directly.
    assert rel < 1e-4
    torch.testing.assert_close(mass, scores, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("estimator,combine", [("sum", "median"), ("mean", "median"), ("sum", "mean")])
def test_kernel_in_generate_matches_reference(estimator, combine):
    model = tiny_llama(layers=2, heads=8, kv_heads=2, hidden=256).to("cuda")  # head_dim 32, GQA 4
    assert_same_generation(model, True, "reference", "cuda", lengths=(700, 400), estimator=estimator, combine=combine)


def check_linear_generation_across_growth(device, new_tokens: int = 80) -> list[int]:
    """``generate`` under the linear combine for long enough that the in-place store grows twice: the kernel gives
    the reference's tokens, and each growth rebuilt the bucket order over the positions hashed by then. Returns
    each layer's listed positions."""
    from kvreviver_core.kernels.inplace_step import LENGTH_CHUNK  # needs Triton

    model = tiny_llama(layers=2, heads=8, kv_heads=2, hidden=256).to(device)
    prompts = padded_prompts((700, 400), model.config.vocab_size, device)
    with torch.no_grad():
        ids, cache = generate_with(model, True, device, prompts, new_tokens=new_tokens, combine="mean")
        ref, _ = generate_with(model, "reference", device, prompts, new_tokens=new_tokens, combine="mean")
    assert ids.tolist() == ref.tolist()
    listed = []
    for layer in cache.layers:
        store = layer._inplace
        assert store is not None and store.capacity >= 700 + new_tokens
        listed.append(store.order[0].shape[-1])
        assert layer.logical_len - LENGTH_CHUNK <= listed[-1] < layer.logical_len, (listed, layer.logical_len)
    return listed


@pytest.mark.gpu
@gpu
def test_linear_bucket_order_is_rebuilt_as_the_store_grows():
    check_linear_generation_across_growth("cuda")


@pytest.mark.gpu
@gpu
def test_linear_chain_launches_as_dependents_and_keeps_the_reference_tokens(monkeypatch):
    """On Hopper the in-place step's chain after the append runs as programmatic dependent launches (PDL): the
    tokens are the reference's with it and without it (a dependent that read before its wait would change them)."""
    from kvreviver_core.kernels import inplace_step, reviver_decode

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or later")
    chained = []

    def spy(*args, **kwargs):
        step = reviver_decode.attend_splits(*args, **kwargs)
        chained.append(step.chained)
        return step

    monkeypatch.setattr(inplace_step, "attend_splits", spy)
    model = tiny_llama(layers=2, heads=8, kv_heads=2, hidden=256).to("cuda")
    prompts = padded_prompts((2000, 1500), model.config.vocab_size, "cuda")
    with torch.no_grad():
        ref, _ = generate_with(model, "reference", "cuda", prompts, new_tokens=24, combine="mean")
        ids_dependent, _ = generate_with(model, True, "cuda", prompts, new_tokens=24, combine="mean")
        dependent = list(chained)
        monkeypatch.setattr(reviver_decode, "PDL", False)
        chained.clear()
        ids_serial, _ = generate_with(model, True, "cuda", prompts, new_tokens=24, combine="mean")
    assert dependent and all(dependent) and chained and not any(chained)
    assert ids_dependent.tolist() == ref.tolist() == ids_serial.tolist()


TRADE_CASES = [
    # estimator, rows, signed_keys, dtype[, combine]
    ("sum", 3, False, torch.float32),
    ("mean", 3, False, torch.float32),
    ("sum", 1, False, torch.float32),
    ("mean", 3, True, torch.float32),
    ("sum", 3, False, torch.bfloat16),
    ("mean", 3, True, torch.bfloat16),
    ("sum", 3, False, torch.float32, "mean"),
    ("mean", 3, True, torch.bfloat16, "mean"),
]


def drop_buckets(layer: ReviverLayer, row: int) -> None:
    """Give sequence ``row`` no sketch buckets (it then drops what it folds and never swaps), as its planning would."""
    layer.sketch.buckets[row] = 0
    layer._swapping = (layer.compressing.to(layer.device) & layer.sketch.enabled).view(-1, 1)
    layer._sketch_everywhere = False


def inplace_steps_both_ways(estimator, rows, signed_keys, dtype, device, steps: int = 20, seed: int = 0,
                            dropped_row: int | None = None, combine: str = "median"):
    """``steps`` decode steps of one layer's bookkeeping (update, then observe with a random mass that lifts two
    tokens per head far up, and 40 at one step), once through the torch compress step and once through the in-place
    step's kernels.

    Narrow sketch rows (~10 buckets): swaps hit buckets that folds and other swaps hit, and the step of 40 swaps
    more tokens per head than one round of the kernel holds. Returns both layers and the exact map before the steps.
    """
    torch_layer, valid = compressed_layer(estimator, SPLITS["wide-vague"], fraction=0.2, batch=3, heads=4,
                                          head_dim=64, prompt=400, seed=seed, device=device, dtype=dtype, rows=rows,
                                          signed_keys=signed_keys, combine=combine)
    if dropped_row is not None:
        drop_buckets(torch_layer, dropped_row)
    inplace_layer = copy.deepcopy(torch_layer)
    inplace_layer.fused = True
    before = torch_layer.exact_map()
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        new_k, new_v = (torch.randn(3, 4, 1, 64, generator=gen).to(device, dtype) for _ in range(2))
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
        mass = torch.rand(3, 4, valid.shape[1], generator=gen).to(device) * 0.1
        lifts = 40 if step == steps // 2 else 2
        lifted = torch.randint(0, valid.shape[1], (3, 4, lifts), generator=gen).to(device)
        mass.scatter_add_(2, lifted, torch.full((3, 4, lifts), 30.0, device=device))
        for layer in (torch_layer, inplace_layer):
            layer.update(new_k, new_v)
            layer.observe(mass * valid.unsqueeze(1), valid)
    assert inplace_layer._inplace is not None and torch_layer._inplace is None
    return torch_layer, inplace_layer, before


def exact_by_position(layer: ReviverLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact store's keys and values laid out by position ``(B, H, N, D)`` (zeros elsewhere): slot order aside."""
    b, h, n, d = layer.batch, layer.heads, layer.logical_len, layer.head_dim
    spot = torch.where(layer.exact_pos >= 0, layer.exact_pos.long(), n).unsqueeze(-1).expand(-1, -1, -1, d)
    dense = [layer.exact_keys.new_zeros(b, h, n + 1, d).scatter(2, spot, part)[:, :, :n]
             for part in (layer.exact_keys, layer.exact_values)]
    return dense[0], dense[1]


def assert_vectors_close(kernel: torch.Tensor, torch_path: torch.Tensor) -> None:
    """Buckets (or the estimates read from them) ``(..., D)``: in fp32 they differ by summation order only. In bf16
    the kernel rounds after each update of a bucket, torch once per step, and the difference builds up over the
    steps: allow each bucket vector an error norm of one eighth of one token's key norm (sqrt(64) = 8 here), where
    a token left out or added twice moves a bucket by a whole token."""
    if kernel.dtype == torch.float32:
        torch.testing.assert_close(kernel, torch_path, rtol=1e-5, atol=1e-5)
        return
    error = float((kernel.float() - torch_path.float()).norm(dim=-1).max())
    assert error <= 1.0, f"bucket vectors off by a norm of {error:.3g}"


def check_inplace_steps(case, dropped_row, device) -> str:
    estimator, rows, signed_keys, dtype = case[:4]
    torch_layer, inplace_layer, before = inplace_steps_both_ways(estimator, rows, signed_keys, dtype, device,
                                                                 dropped_row=dropped_row,
                                                                 combine=case[4] if len(case) > 4 else "median")
    # Every decision follows the scores, which both paths add up alike: the same tokens end up exact.
    assert torch.equal(inplace_layer.scores, torch_layer.scores)
    held = torch_layer.exact_map()
    assert torch.equal(inplace_layer.exact_map(), held)
    start = before.shape[-1]
    swapped_back = int((held[:, :, :start] & ~before).sum())
    folded = int((~held[:, :, start:]).sum())
    assert swapped_back > 0 and folded > 0  # both moves were exercised
    # The exact store holds the same keys and values by position; its free slots differ (no compaction in place).
    # Swapped-back tokens hold estimates read from buckets, which may differ in their last bits.
    for ours, theirs in zip(exact_by_position(inplace_layer), exact_by_position(torch_layer)):
        assert_vectors_close(ours, theirs)
    assert_vectors_close(inplace_layer.sketch.keys, torch_layer.sketch.keys)
    assert_vectors_close(inplace_layer.sketch.values, torch_layer.sketch.values)
    if estimator == "mean":
        assert torch.equal(inplace_layer.sketch.counts, torch_layer.sketch.counts)
    # The kept part map is the one a decode would build from the store.
    store = inplace_layer._inplace
    length = inplace_layer.logical_len
    expected = inplace_layer.valid_positions().to(torch.int8).expand_as(held) + held.to(torch.int8)
    assert torch.equal(store.part[:, :, :length], expected)
    assert not bool(store.part[:, :, length:].any())
    assert torch.equal(store.codes[:, :, :length], slot_codes(inplace_layer.sketch, length))
    return f"{swapped_back} tokens swapped back, {folded} folded"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dropped_row", [None, 1], ids=["buckets-everywhere", "row-without-buckets"])
@pytest.mark.parametrize("case", TRADE_CASES,
                         ids=lambda c: f"{c[0]}-r{c[1]}{'-signed' * c[2]}-{str(c[3])[6:]}{'-' + c[4] if len(c) > 4 else ''}")
def test_inplace_steps_match_the_torch_steps(case, dropped_row):
    print(case, dropped_row, check_inplace_steps(case, dropped_row, "cuda"))


def slot_codes(sketch, length):
    from kvreviver_core.kernels.reviver_decode import slot_codes as codes  # Triton: GPU machines only

    return codes(sketch, length)
