"""Eviction baselines (streaming, h2o, snapkv, cam): equivalence with the full cache, eviction against masking,
CaM's merge, memory at 4k tokens on SmolLM2, batches and GQA.

References are independent of the code under test: the full cache, a plain-torch attention with a per-head mask
over the full K/V, hand-computed merges, and the model's own configuration for the full cache's size.
"""

from __future__ import annotations

import pydoc_data.topics
import pytest
import torch
from transformers import AttentionInterface, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvreviver_core import Budget, list_methods, make_cache
from kvreviver_core.methods import METHODS, Method
from kvreviver_core.methods.cam import CaMLayer
from kvreviver_core.methods.eviction import EvictionLayer
from kvreviver_core.methods.h2o import H2OScorer
from kvreviver_core.methods.snapkv import SnapKVScorer
from kvreviver_core.generation import cache_kwargs
from tests.conftest import greedy, left_padded, tiny_llama

BASELINES = ("streaming", "h2o", "snapkv", "cam")


def cache_or_skip(method: str, budget, model, **options):
    """A method whose ``prepare`` fails is one that needs a calibration file (the default prepare does nothing)."""
    if METHODS[method].prepare is not Method.prepare:
        try:
            METHODS[method]().prepare(model)
        except (ValueError, FileNotFoundError) as exc:
            pytest.skip(f"{method} is not calibrated for this model: {exc}")
    return make_cache(method, budget, model=model, **options)


# -- 1. a budget covering the context is the full cache ---------------------------------------------------------
@pytest.mark.parametrize("method", list_methods())
@torch.no_grad()
def test_budget_covering_the_context_gives_the_full_cache_logits(method, tiny_model):
    _, ids, mask = left_padded((48, 35), seed=0)
    full_seq, full_logits = greedy(tiny_model, ids, make_cache("full", 1.0, model=tiny_model), mask)
    for budget in (1.0, Budget(tokens=4096)):
        seq, logits = greedy(tiny_model, ids, cache_or_skip(method, budget, tiny_model), mask)
        assert (logits - full_logits).abs().max() < 1e-4, f"{method} at {budget}"
        assert torch.equal(seq, full_seq)


@pytest.mark.parametrize("method", BASELINES)
@torch.no_grad()
def test_a_small_budget_changes_the_output_so_the_equivalence_can_fail(method, tiny_model):
    _, ids, mask = left_padded((60, 45), seed=1)
    _, full_logits = greedy(tiny_model, ids, make_cache("full", 1.0, model=tiny_model), mask, new_tokens=3)
    cache = make_cache(method, 0.3, model=tiny_model)
    _, logits = greedy(tiny_model, ids, cache, mask, new_tokens=3)
    assert (logits - full_logits).abs().max() > 1e-3
    for layer in cache.layers:  # every layer, hence the one HF builds the mask from, holds the same slots
        assert layer.physical_length() == cache.layers[0].physical_length() < layer.get_seq_length()
        assert (layer.held() <= layer.capacity).all()


# -- 2. memory at budget 0.25 on a 4k-token prompt with SmolLM2 ------------------------------------------------
def first_layers(model, count: int):
    """The model cut to its first ``count`` decoder layers, sharing the weights (the fixture stays untouched)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = count
    small = LlamaForCausalLM(config).eval()
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < count}
    small.load_state_dict(kept, assign=True)
    small.tie_weights()
    return small


@pytest.fixture(scope="module")
def smollm2_4k(smollm2):
    model, tokenizer = smollm2
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :4096]
    assert ids.shape[1] == 4096
    # Its first layer of 30 keeps this within the CPU budget: every layer holds and charges the same way.
    return first_layers(model, 1), ids


@pytest.mark.slow
@pytest.mark.parametrize("method", [name for name in list_methods() if name != "full"])
@torch.no_grad()
def test_memory_at_a_quarter_budget_on_4k_tokens_of_smollm2(method, smollm2_4k):
    model, ids = smollm2_4k
    cache = cache_or_skip(method, 0.25, model)
    model(ids, logits_to_keep=1, **cache_kwargs(model, cache))
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    full = config.num_hidden_layers * 4096 * 2 * config.num_key_value_heads * head_dim * 4  # fp32 K and V
    assert cache.full_bytes() == full
    assert cache.memory_bytes() <= 0.27 * full, f"{method}: {cache.memory_bytes() / full:.3f} of the full cache"
    assert cache.memory_bytes() >= 0.2 * full, f"{method} starves its budget: {cache.memory_bytes() / full:.3f}"


# -- 3. eviction equals masking --------------------------------------------------------------------------------
REFERENCE = "test_masked_reference"
reference_masks: dict[int, torch.Tensor] = {}
reference_scores: dict[int, torch.Tensor] = {}


def masked_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain attention over the full K/V with a per-(sequence, KV head, query) mask ``(B, Hkv, T, N)``."""
    allowed = reference_masks[module.layer_idx]
    group = query.shape[1] // key.shape[1]
    logits = query @ key.repeat_interleave(group, 1).transpose(-1, -2) * scaling
    logits = logits.masked_fill(~allowed.repeat_interleave(group, 1), float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1).nan_to_num(0.0)
    b, hq, t, n = probs.shape
    reference_scores[module.layer_idx] = probs.view(b, hq // group, group, t, n).sum(2)
    return (probs.to(value.dtype) @ value.repeat_interleave(group, 1)).transpose(1, 2), None


def record_attended_positions(cache) -> list[dict[int, torch.Tensor]]:
    """Wrap the cache's update: per forward call, each layer's slot positions as attention sees them."""
    calls: list[dict[int, torch.Tensor]] = []
    update = cache.update

    def recording_update(key_states, value_states, layer_idx, *args, **kwargs):
        out = update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == 0:
            calls.append({})
        calls[-1][layer_idx] = cache.layers[layer_idx].positions.clone()
        return out

    cache.update = recording_update
    return calls


def reference_masks_from(calls, mask: torch.Tensor, heads: int, total: int) -> dict[int, torch.Tensor]:
    """Prefill queries: causal over the real tokens. Decode query j: exactly the positions its call attended."""
    b, prompt = mask.shape
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    real = torch.cat([mask.bool(), torch.ones(b, total - prompt, dtype=torch.bool)], dim=1)
    masks = {}
    for layer in calls[0]:
        allowed = (causal.view(1, 1, total, total) & real.view(b, 1, 1, total)).expand(b, heads, total, total).clone()
        for step, call in enumerate(calls[1:]):
            q = prompt + step
            positions = call[layer].long()
            row = torch.zeros(b, heads, total + 1, dtype=torch.bool)  # empty slots land in the extra column
            row.scatter_(2, torch.where(positions >= 0, positions, total), True)
            allowed[:, :, q] = row[:, :, :total]
        masks[layer] = allowed
    return masks


def run_reference(model, sequences, mask, masks) -> torch.Tensor:
    AttentionInterface.register(REFERENCE, masked_reference_attention)
    AttentionMaskInterface.register(REFERENCE, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(REFERENCE)
    reference_masks.clear()
    reference_masks.update(masks)
    try:
        full_mask = torch.cat([mask, torch.ones(mask.shape[0], sequences.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        return model(sequences, attention_mask=full_mask, position_ids=positions).logits
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("method", ["streaming", "h2o"])
@torch.no_grad()
def test_eviction_equals_full_attention_masking_the_evicted_tokens(method):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, seed=11)
    _, ids, mask = left_padded((70, 52), seed=12)
    steps = 6
    cache = make_cache(method, 0.3, model=model)
    calls = record_attended_positions(cache)
    seq, logits = greedy(model, ids, cache, mask, new_tokens=steps)
    fed = seq[:, : ids.shape[1] + steps - 1]
    masks = reference_masks_from(calls, mask, heads=2, total=fed.shape[1])
    reference = run_reference(model, fed, mask, masks)[:, ids.shape[1] - 1 :]
    assert (reference - logits).abs().max() < 1e-4

    # The reference is sensitive: at the last step, attending one evicted token instead of one kept token (the
    # mistake of a wrong position or a wrong mask) changes the logits.
    wrong = {layer: m.clone() for layer, m in masks.items()}
    last = fed.shape[1] - 1
    real = torch.cat([mask.bool(), torch.ones(2, last - mask.shape[1], dtype=torch.bool)], dim=1)
    for m in wrong.values():
        for b in range(2):
            for h in range(2):
                attended = m[b, h, last, :last].nonzero().flatten()
                evicted = (~m[b, h, last, :last] & real[b]).nonzero().flatten()
                m[b, h, last, attended[len(attended) // 2]] = False
                m[b, h, last, evicted[len(evicted) // 2]] = True
    assert (run_reference(model, fed, mask, wrong)[:, ids.shape[1] - 1 :] - logits).abs().max() > 1e-3

    offsets = (mask == 0).sum(-1)
    for step, call in enumerate(calls[1:]):
        logical = ids.shape[1] + step + 1
        for b in range(2):
            for h in range(2):
                kept = sorted(int(p) - int(offsets[b]) for p in call[0][b, h] if p >= 0)
                capacity = int(cache.layers[0].capacity[b])
                assert len(kept) == capacity + 1  # capacity kept, plus the token being decoded
                if method == "streaming":  # the first 4 real tokens, then the newest (pads never count)
                    real_len = logical - int(offsets[b])
                    assert kept == list(range(4)) + list(range(real_len - capacity + 3, real_len))
    if method == "h2o":
        check_h2o_choice(cache, calls, masks, model, fed, mask)


def check_h2o_choice(cache, calls, masks, model, fed, mask):
    """After each call, H2O held the newest half of its capacity and the rest by the reference's cumulative scores."""
    run_reference(model, fed, mask, masks)
    prompt, offsets = mask.shape[1], (mask == 0).sum(-1)
    for layer_idx, probs in reference_scores.items():
        capacity = cache.layers[layer_idx].capacity
        for k in range(1, len(calls)):
            last_query = prompt - 1 + (k - 1)  # the newest query of call k-1, after which it evicted
            cumulative = probs[:, :, : last_query + 1].sum(2)
            before, after = calls[k - 1][layer_idx], calls[k][layer_idx]
            for b in range(2):
                recent = int(round(float(capacity[b]) * 0.5))
                for h in range(2):
                    held = [p for p in before[b, h].tolist() if p >= int(offsets[b])]
                    newest = sorted(held)[-recent:]
                    rest = sorted(set(held) - set(newest), key=lambda p: -float(cumulative[b, h, p]))
                    expected = set(newest) | set(rest[: int(capacity[b]) - recent])
                    kept = set(after[b, h][after[b, h] >= 0].tolist()) - {last_query + 1}
                    assert kept == expected, f"layer {layer_idx} call {k} row {b} head {h}"


# -- 4. CaM merges dropped values ------------------------------------------------------------------------------
def cam_and_h2o_after_one_drop(dropped_score: float, heads: int = 1, merge_span: int = 2):
    """Nine tokens, capacity 8 (tokens=10 budget minus 8 B/slot of metadata), recent window 4: token 4 is dropped.

    Values are zero except the dropped token's, ``(1, 0, 0, 0)``; the recent targets 5 and 6 draw little attention.
    """
    torch.manual_seed(0)
    keys = torch.randn(1, heads, 9, 4, dtype=torch.float64)
    values = torch.zeros(1, heads, 9, 4, dtype=torch.float64)
    values[:, :, 4, 0] = 1.0
    scores = torch.tensor([5.0, 5.0, 5.0, 5.0, dropped_score, 0.1, 0.1, 0.1, 0.1]).expand(1, heads, 9).float()
    layers = {
        "cam": CaMLayer(0, Budget(tokens=10), recent_share=0.5, merge_span=merge_span, seed=0),
        "h2o": EvictionLayer(0, Budget(tokens=10), H2OScorer(0.5)),
    }
    for layer in layers.values():
        layer.update(keys.clone(), values.clone())
        layer.observe(scores.clone(), torch.ones(1, 9, dtype=torch.bool))
        assert layer.capacity.tolist() == [8]
        assert 4 not in layer.kept_positions()[0][0]
    return layers, keys, values


def test_cam_spreads_a_dropped_value_over_the_next_kept_tokens_and_moves_the_output_toward_full():
    # Token 4's average attention 0.5/5 beats its targets' (0.1/4 + 0.1/3)/2: merge probability 1.
    layers, keys, values = cam_and_h2o_after_one_drop(dropped_score=0.5)
    cam, h2o = layers["cam"], layers["h2o"]
    slot = {p: i for i, p in enumerate(cam.positions[0, 0].tolist())}
    expected = torch.zeros(9, 4, dtype=torch.float64)
    expected[5, 0] = expected[6, 0] = 0.5  # V_4 / m over the m = 2 kept tokens after it
    for p in range(9):
        if p != 4:
            torch.testing.assert_close(cam.values[0, 0, slot[p]], expected[p])
            torch.testing.assert_close(cam.keys[0, 0, slot[p]], keys[0, 0, p])  # keys are never merged
    assert torch.equal(h2o.values, torch.zeros_like(h2o.values))

    query = keys[0, 0].mean(0)
    def output(k, v):
        return torch.softmax(k @ query, 0) @ v
    full = output(keys[0, 0], values[0, 0])[0]
    evicted = output(h2o.keys[0, 0], h2o.values[0, 0])[0]
    merged = output(cam.keys[0, 0], cam.values[0, 0])[0]
    assert evicted == 0 and full > 0 and merged > 0  # the merged value pulls the output toward the full cache's
    assert abs(merged - full) < abs(evicted - full)


def test_cam_does_not_merge_a_token_nobody_attended():
    layers, _, _ = cam_and_h2o_after_one_drop(dropped_score=0.0)
    assert torch.equal(layers["cam"].values, layers["h2o"].values)


def test_cam_merges_with_the_papers_probability():
    # Token 4 at 0.5 x its targets' average attention: merged with probability 0.5, drawn per head.
    target_mean = (0.1 / 4 + 0.1 / 3) / 2
    layers, _, _ = cam_and_h2o_after_one_drop(dropped_score=0.5 * target_mean * 5, heads=2000)
    merged = (layers["cam"].values[..., 0] != 0).any(-1).float().mean()
    assert abs(float(merged) - 0.5) < 4 * (0.25 / 2000) ** 0.5


@torch.no_grad()
def test_cam_merges_on_the_real_model_and_changes_the_output(tiny_model):
    _, ids, mask = left_padded((60, 45), seed=2)
    caches = {m: make_cache(m, 0.3, model=tiny_model) for m in ("h2o", "cam")}
    logits = {m: greedy(tiny_model, ids, c, mask, new_tokens=2)[1] for m, c in caches.items()}
    # Prefill attends every token before evicting; the first decode step sees merged values.
    assert (logits["cam"][:, 0] - logits["h2o"][:, 0]).abs().max() < 1e-5
    assert (logits["cam"][:, 1] - logits["h2o"][:, 1]).abs().max() > 1e-4


# -- SnapKV's prefill choice -----------------------------------------------------------------------------------
def test_snapkv_keeps_the_window_and_the_best_pooled_prefix_tokens():
    torch.manual_seed(1)
    n, window = 40, 8
    layer = EvictionLayer(0, Budget(tokens=20), SnapKVScorer(window=window, kernel=3))
    assert layer.score_queries(n) is None or layer.score_queries(n) == window
    scores = torch.zeros(1, 1, n)
    scores[0, 0, [3, 17, 25]] = torch.tensor([1.0, 3.0, 2.0])
    scores[0, 0, n - window:] = 50.0  # the window's own columns must not vote
    layer.update(torch.randn(1, 1, n, 4), torch.randn(1, 1, n, 4))
    layer.observe(scores, torch.ones(1, n, dtype=torch.bool))
    capacity = int(layer.capacity)
    assert capacity == 20 * 32 // 40
    kept = layer.kept_positions()[0][0]
    # Pooling (kernel 3) lifts each voted token's neighbours: 16-18, 24-26 and 2-4 fill the 8 prefix slots in order.
    assert kept == set(range(n - window, n)) | {16, 17, 18, 24, 25, 26} | (kept & {2, 3, 4})
    assert len(kept & {2, 3, 4}) == capacity - window - 6
    assert layer.score_queries(1) == 0  # decode: no scores


# -- 5. batches and GQA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list_methods())
@torch.no_grad()
def test_batch_rows_equal_running_each_prompt_alone_with_gqa(method):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, seed=7)
    prompts, ids, mask = left_padded((41, 64, 26), seed=8)
    batched, _ = greedy(model, ids, cache_or_skip(method, 0.4, model), mask)
    for i, p in enumerate(prompts):
        solo, _ = greedy(model, p.view(1, -1), cache_or_skip(method, 0.4, model))
        assert torch.equal(batched[i, ids.shape[1]:], solo[0, len(p):]), f"{method}: prompt {i}"


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("streaming", dict(sinks=-1), "sinks"),
        ("h2o", dict(recent_share=1.5), "recent_share"),
        ("snapkv", dict(kernel=4), "odd"),
        ("snapkv", dict(window=0), "window"),
        ("cam", dict(merge_span=-2), "merge_span"),
    ],
)
def test_bad_options_raise_clear_value_errors(method, options, message, tiny_model):
    with pytest.raises(ValueError, match=message):
        make_cache(method, 0.5, model=tiny_model, **options)
