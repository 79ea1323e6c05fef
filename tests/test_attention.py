"""scored_attention (kvreviver_core/attention.py) against softmax attention written out in fp32."""

from __future__ import annotations

import pytest
import torch

from kvreviver_core import attention


def direct(query, key, value, mask, scaling, first_scored):
    """Every (query, key) logit at once: the output (B, T, Hq, D) and the probabilities' column sums over the
    queries from ``first_scored`` on, per KV head (B, Hkv, N)."""
    group = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    logits = (query @ k.transpose(-1, -2)) * scaling
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    scores = probs[:, :, first_scored:].sum(dim=2)
    return (probs @ v).transpose(1, 2), scores.view(key.shape[0], key.shape[1], group, -1).sum(dim=2)


@pytest.mark.parametrize("chunk_elements", [None, 4 * 8 * 24 * 40, 8 * 40 * 5],
                         ids=["default", "whole-sequences-per-chunk", "one-sequence-5-queries-per-chunk"])
@pytest.mark.parametrize("score_queries", [None, 7])
def test_chunking_over_sequences_and_queries_gives_the_direct_result(monkeypatch, chunk_elements, score_queries):
    if chunk_elements is not None:
        monkeypatch.setattr(attention, "CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, t, n, d = 5, 8, 2, 24, 40, 16
    query = torch.randn(batch, heads, t, d, generator=gen)
    key, value = torch.randn(batch, kv_heads, n, d, generator=gen), torch.randn(batch, kv_heads, n, d, generator=gen)
    causal = torch.arange(n).view(1, -1) <= torch.arange(n - t, n).view(-1, 1)
    mask = causal.expand(batch, 1, t, n).clone()
    mask[1, :, :, :9] = False  # a left-padded sequence
    mask[3, :, -1] = False  # a query with nothing to attend (a padding query), scored in both cases
    out, scores = attention.scored_attention(query, key, value, mask, d**-0.5, score_queries)
    first_scored = 0 if score_queries is None else t - score_queries
    want_out, want_scores = direct(query, key, value, mask, d**-0.5, first_scored)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert float(out[3, -1].abs().max()) == 0.0 and float(scores.sum()) == pytest.approx(
        (batch * (t - first_scored) - 1) * heads, rel=1e-5)
