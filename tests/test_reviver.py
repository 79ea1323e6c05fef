"""KVReviver cache: equivalence with the full cache, revive/compress against references, memory, batching, errors."""

from __future__ import annotations

import pydoc_data.topics
import pytest
import torch

from kvreviver_core import Budget, make_cache
from kvreviver_core.generation import cache_kwargs
from kvreviver_core.methods.reviver import ReviverLayer
from kvreviver_core.specs import method_spec
from tests.conftest import tiny_llama
from tests.test_sketch import naive_query


def greedy(model, input_ids, cache=None, attention_mask=None, new_tokens=12):
    kwargs = cache_kwargs(model, cache) if cache is not None else {}
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.logits)


@torch.no_grad()
def test_budget_covering_the_context_gives_the_full_cache_logits(tiny_model):
    ids = torch.randint(3, 128, (2, 90), generator=torch.Generator().manual_seed(0))
    full_seq, full_logits = greedy(tiny_model, ids, make_cache("full", 1.0, model=tiny_model))
    plain_seq, plain_logits = greedy(tiny_model, ids)  # DynamicCache, through the same registered attention
    seq, logits = greedy(tiny_model, ids, make_cache("kvreviver", 1.0, model=tiny_model))
    assert (logits - full_logits).abs().max() < 1e-4
    assert (plain_logits - full_logits).abs().max() < 1e-4
    assert torch.equal(seq, full_seq)


@torch.no_grad()
def test_compression_changes_the_output_so_the_equivalence_test_can_fail(tiny_model):
    ids = torch.randint(3, 128, (1, 120), generator=torch.Generator().manual_seed(1))
    _, full_logits = greedy(tiny_model, ids, make_cache("full", 1.0, model=tiny_model))
    _, logits = greedy(tiny_model, ids, make_cache("kvreviver", 0.2, model=tiny_model))
    assert (logits - full_logits).abs().max() > 1e-3


def feed_prefill(layer: ReviverLayer, keys, values, scores):
    layer.update(keys, values)
    layer.observe(scores, torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool))


def test_revive_puts_exact_tokens_and_the_sketch_estimate_of_the_others_in_position_order():
    torch.manual_seed(3)
    b, h, n, d = 1, 2, 60, 8
    keys, values = torch.randn(b, h, n, d, dtype=torch.float64), torch.randn(b, h, n, d, dtype=torch.float64)
    scores = torch.rand(b, h, n, dtype=torch.float32)
    layer = ReviverLayer(0, Budget(tokens=24, split=(0.25, 0.5, 0.25), recent_slack=0))
    feed_prefill(layer, keys, values, scores)
    parts = layer.parts()
    assert parts["recent"].item() + parts["candidate"].item() + parts["vague"].item() == n
    revived_k, revived_v = layer.revive()
    assert revived_k.shape[2] == n == layer.get_seq_length()
    exact = layer.exact_map()
    for head in range(h):
        held = exact[0, head]
        # Recent: the newest tokens; Candidate: the highest-scored of the rest (Algorithm 3 at prefill).
        recent = parts["recent"].item()
        assert held[n - recent:].all()
        older = torch.arange(n - recent)
        chosen = older[held[: n - recent]]
        others = older[~held[: n - recent]]
        assert scores[0, head, chosen].min() >= scores[0, head, others].max()
        torch.testing.assert_close(revived_k[0, head, held], keys[0, head, held])
        torch.testing.assert_close(revived_v[0, head, held], values[0, head, held])
        vague = {int(p): (keys[0, head, p], values[0, head, p]) for p in others}
        head_sketch = layer.sketch
        for p in list(vague)[:10]:
            # The naive reference of Algorithms 1-2 over exactly the Vague tokens of this head.
            one_head = _single_head_view(head_sketch, head)
            want_k, want_v = naive_query(one_head, vague, p)
            torch.testing.assert_close(revived_k[0, head, p], want_k)
            torch.testing.assert_close(revived_v[0, head, p], want_v)


def _single_head_view(sketch, head):
    from copy import copy

    view = copy(sketch)
    view.keys, view.values = sketch.keys[:, head : head + 1], sketch.values[:, head : head + 1]
    return view


def test_a_vague_token_whose_score_rises_is_swapped_back_with_its_reconstruction():
    torch.manual_seed(4)
    b, h, n, d = 1, 1, 40, 8
    keys, values = torch.randn(b, h, n, d, dtype=torch.float64), torch.randn(b, h, n, d, dtype=torch.float64)
    scores = torch.linspace(1.0, 2.0, n).view(1, 1, n).clone()
    target = 3
    scores[0, 0, target] = 0.0  # lowest: folded into the sketch at prefill
    # The slack keeps Recent from spilling into Candidate at the next step, so no fold changes the sketch before
    # the swap and the reconstruction read now is the one the token returns with.
    layer = ReviverLayer(0, Budget(tokens=20, split=(0.3, 0.35, 0.35), recent_slack=2))
    feed_prefill(layer, keys, values, scores)
    assert not layer.exact_map()[0, 0, target]
    estimate_k, estimate_v = layer.sketch.query(torch.tensor([[[target]]]))
    assert (estimate_k[0, 0, 0] - keys[0, 0, target]).abs().max() > 1e-3  # it collided: the estimate is not exact

    new_k, new_v = torch.randn(b, h, 1, d, dtype=torch.float64), torch.randn(b, h, 1, d, dtype=torch.float64)
    layer.update(new_k, new_v)
    step_scores = torch.zeros(1, 1, n + 1)
    step_scores[0, 0, target] = 100.0  # attention on the revived token makes it the highest-scored
    lowest_candidate = int(layer.exact_pos[0, 0][layer.exact_pos[0, 0] >= 0].min())  # oldest slots hold low scores
    layer.observe(step_scores, torch.ones(1, n + 1, dtype=torch.bool))
    assert layer.exact_map()[0, 0, target]
    slot = (layer.exact_pos[0, 0] == target).nonzero().item()
    torch.testing.assert_close(layer.exact_keys[0, 0, slot], estimate_k[0, 0, 0])
    torch.testing.assert_close(layer.exact_values[0, 0, slot], estimate_v[0, 0, 0])
    revived_k, _ = layer.revive()
    assert revived_k.shape[2] == n + 1
    torch.testing.assert_close(revived_k[0, 0, target], estimate_k[0, 0, 0])
    assert not layer.exact_map()[0, 0, lowest_candidate] or lowest_candidate == target


def test_swap_back_ends_where_the_papers_one_at_a_time_loop_does():
    torch.manual_seed(6)
    b, h, n, d = 1, 2, 200, 8
    keys, values = torch.randn(b, h, n, d, dtype=torch.float64), torch.randn(b, h, n, d, dtype=torch.float64)
    budget = Budget(tokens=120, split=(0.2, 0.5, 0.3), recent_slack=2)
    layer = ReviverLayer(0, budget)
    feed_prefill(layer, keys, values, torch.rand(b, h, n))
    new_k, new_v = torch.randn(b, h, 1, d, dtype=torch.float64), torch.randn(b, h, 1, d, dtype=torch.float64)
    layer.update(new_k, new_v)
    # Raise many Vague tokens above the Candidates, a different number on each head.
    step_scores = torch.zeros(b, h, n + 1)
    vague = ~layer.exact_map() & layer.valid_positions()
    for head, raised in enumerate((53, 13)):
        chosen = vague[0, head].nonzero().flatten()[torch.randperm(int(vague[0, head].sum()))[:raised]]
        step_scores[0, head, chosen] = 1.0 + torch.rand(raised)
    scores = layer.scores[0] + step_scores[0]
    recent_start = n + 1 - int(layer.recent_count[0])
    want, swaps = [], []
    for head in range(h):
        pos = layer.exact_pos[0, head].long()
        candidates = {int(p) for p in pos[(pos >= 0) & (pos < recent_start)]}
        vague_set = {int(p) for p in vague[0, head].nonzero().flatten()}
        swaps.append(0)
        while True:  # the paper's Algorithm 3 swap loop, one pair at a time
            low = min(candidates, key=lambda p: scores[head, p])
            high = max(vague_set, key=lambda p: scores[head, p])
            if not scores[head, low] * budget.replace_rate < scores[head, high]:
                break
            candidates.remove(low), vague_set.remove(high)
            candidates.add(high), vague_set.add(low)
            swaps[-1] += 1
        want.append(candidates)

    layer.observe(step_scores, torch.ones(b, n + 1, dtype=torch.bool))
    for head in range(h):
        pos = layer.exact_pos[0, head].long()
        got = {int(p) for p in pos[(pos >= 0) & (pos < recent_start)]}
        assert got == want[head]
    assert swaps[0] > 40 and 0 < swaps[1] <= 13  # many swaps, and not the same number on each head


@torch.no_grad()
def test_no_token_is_ever_missing_from_the_revived_cache(tiny_model):
    ids = torch.randint(3, 128, (2, 70), generator=torch.Generator().manual_seed(5))
    cache = make_cache("kvreviver", 0.3, model=tiny_model, recent_slack=3)
    out = tiny_model(ids, **cache_kwargs(tiny_model, cache))
    for step in range(25):
        token = out.logits[:, -1:].argmax(-1)
        out = tiny_model(token, **cache_kwargs(tiny_model, cache))
        for layer in cache.layers:
            n = layer.get_seq_length()
            assert n == 70 + step + 1
            parts = layer.parts()
            assert torch.equal(parts["recent"] + parts["candidate"] + parts["vague"], torch.full((2,), n))
            assert layer.revive()[0].shape[2] == n
            held = (layer.exact_pos >= 0)[:, 0].sum(-1)
            assert (held <= layer.capacity).all()  # exact part never exceeds its share of the budget


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_budget_covering_the_context_matches_full_and_memory_at_ten_percent(smollm2):
    model, tokenizer = smollm2
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :4096]
    short = ids[:, :256]
    _, full_logits = greedy(model, short, make_cache("full", 1.0, model=model), new_tokens=4)
    _, logits = greedy(model, short, make_cache("kvreviver", 1.0, model=model), new_tokens=4)
    assert (logits - full_logits).abs().max() < 1e-4

    cache = make_cache("kvreviver", 0.1, model=model)
    model(ids, **cache_kwargs(model, cache))
    assert cache.full_bytes() == 30 * 4096 * 2 * 3 * 64 * 4
    assert cache.memory_bytes() <= 0.11 * cache.full_bytes()
    assert cache.memory_bytes() >= 0.08 * cache.full_bytes()  # the budget is used, not starved


@torch.no_grad()
def test_batch_of_different_lengths_gives_each_prompt_its_solo_tokens():
    model = tiny_llama(layers=2, heads=4, kv_heads=2, seed=7)
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 128, (n,), generator=gen) for n in (40, 64, 51, 90)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    for budget in (0.3, Budget(0.5, split=(0.2, 0.4, 0.4))):
        batched, _ = greedy(model, batch, make_cache("kvreviver", budget, model=model), attention_mask=mask)
        for i, p in enumerate(prompts):
            solo, _ = greedy(model, p.view(1, -1), make_cache("kvreviver", budget, model=model))
            new = solo[0, len(p):]  # ends early at EOS, where the batch's row goes on with padding
            assert torch.equal(batched[i, width:width + len(new)], new), f"prompt {i} at budget {budget}"
            assert not bool(batched[i, width + len(new):].any()), f"prompt {i} at budget {budget}: past EOS"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_half_precision_runs_and_stays_finite(dtype):
    model = tiny_llama(seed=9).to(dtype)
    ids = torch.randint(3, 128, (2, 80), generator=torch.Generator().manual_seed(10))
    cache = make_cache("kvreviver", 0.25, model=model)
    seq, logits = greedy(model, ids, cache, new_tokens=6)
    assert torch.isfinite(logits).all()
    assert cache.layers[0].exact_keys.dtype == dtype and cache.layers[0].sketch.keys.dtype == dtype


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fraction=0.1, split=(0.2, 0.45, 0.45)), "sum to 1"),
        (dict(fraction=0.0), "(0, 1]"),
        (dict(fraction=-0.5), "(0, 1]"),
        (dict(fraction=1.5), "(0, 1]"),
        (dict(fraction=0.1, sketch_rows=0), "r must be"),
        (dict(fraction=0.1, recent_slack=-1), "slack"),
        (dict(fraction=0.1, replace_rate=0.5), "replace rate"),
        (dict(tokens=0), "positive"),
        (dict(), "exactly one"),
    ],
)
def test_bad_budgets_raise_clear_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        Budget(**kwargs)


def test_make_cache_rejects_unknown_methods_and_options(tiny_model):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        make_cache("nope", 0.1, model=tiny_model)
    with pytest.raises(ValueError, match="has no option"):
        make_cache("kvreviver", 0.1, model=tiny_model, bogus=1)
    with pytest.raises(ValueError, match="estimator"):
        make_cache("kvreviver", 0.1, model=tiny_model, estimator="avg")
    with pytest.raises(ValueError, match="sum to 1"):
        make_cache("kvreviver", 0.1, model=tiny_model, split=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="overlap must be true or false"):
        make_cache("kvreviver", 0.1, model=tiny_model, overlap="yes")
    with pytest.raises(ValueError, match="replace rate must be a number"):
        make_cache("kvreviver", 0.1, model=tiny_model, replace_rate="abc")
    # A Budget field that only KVReviver reads would change nothing for another method.
    with pytest.raises(ValueError, match="method 'h2o' has no option split"):
        make_cache("h2o", 0.1, model=tiny_model, split=(0.2, 0.4, 0.4))
    with pytest.raises(ValueError, match="method 'snapkv' has no option sketch_rows"):
        method_spec("snapkv:sketch_rows=2")
    assert make_cache("kvreviver", 0.1, model=tiny_model, sketch_rows=2).budget.sketch_rows == 2


@torch.no_grad()
def test_the_cache_tells_each_layer_whether_another_layer_of_its_device_follows(tiny_model):
    """What lets a layer leave Algorithm 3 on the side stream (kernels/side_stream.py): never the last layer, whose
    step nothing joins."""
    cache = make_cache("kvreviver", 0.25, model=tiny_model)
    greedy(tiny_model, torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0)), cache, new_tokens=2)
    layers = tiny_model.config.num_hidden_layers
    assert layers >= 2 and len(cache.layers) == layers
    assert [layer.followed_on_device for layer in cache.layers] == [True] * (layers - 1) + [False]


def test_without_a_sketch_each_head_masks_exactly_the_tokens_it_dropped():
    """Vague share 0: KV heads keep different tokens, and each must attend only its own (a per-head mask)."""
    from types import SimpleNamespace

    from kvreviver_core.attention import announce_layer, kvreviver_attention

    torch.manual_seed(12)
    h, n, d = 2, 40, 8
    keys, values = torch.randn(1, h, n, d, dtype=torch.float64), torch.randn(1, h, n, d, dtype=torch.float64)
    scores = torch.zeros(1, h, n)
    scores[0, 0, 0::2] = 1.0  # head 0 values even positions, head 1 odd ones
    scores[0, 1, 1::2] = 1.0
    layer = ReviverLayer(0, Budget(tokens=24, split=(0.0, 0.5, 0.5), recent_slack=0), fused=False)
    feed_prefill(layer, keys, values, scores)
    held = layer.exact_map()[0]
    assert not torch.equal(held[0], held[1])
    new_k, new_v = torch.randn(1, h, 1, d, dtype=torch.float64), torch.randn(1, h, 1, d, dtype=torch.float64)
    k_all, v_all = layer.update(new_k, new_v)
    announce_layer(0, layer)
    query = torch.randn(1, 2 * h, 1, d, dtype=torch.float64)
    out, _ = kvreviver_attention(SimpleNamespace(layer_idx=0), query, k_all, v_all, None, scaling=d**-0.5)
    full_k, full_v = torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2)
    for head in range(2 * h):
        kv = head // 2
        allowed = torch.cat([held[kv], torch.tensor([True])])
        logits = (query[0, head, 0] @ full_k[0, kv].T) * d**-0.5
        want = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ full_v[0, kv]
        torch.testing.assert_close(out[0, 0, head], want)
