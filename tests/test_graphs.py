"""Decode steps replayed from CUDA graphs (kvreviver_core/graphs.py) against the same steps run eagerly."""

from __future__ import annotations

import pytest
import torch

from kvreviver_core import make_cache
from kvreviver_core.budget import Budget
from kvreviver_core.generation import cache_kwargs, greedy_next
from kvreviver_core.graphs import GraphedDecode
from kvreviver_core.kernels import side_stream, triton_available
from kvreviver_core.methods.full import STATIC_CHUNK
from tests.conftest import tiny_llama
from tests.test_kernel import SPLITS


@torch.no_grad()
def check_static_full_cache(device: str, dtype: torch.dtype, tolerance: dict) -> None:
    """The static layout (fixed capacity, a device-kept length, the slots past it masked) computes what the full
    cache computes, across a growth of its buffers; its graph key changes exactly when they grow."""
    model = tiny_llama().to(device, dtype)
    prompt = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0)).to(device)
    caches = {static: make_cache("full", model=model, static=static) for static in (False, True)}
    forwards = {static: cache_kwargs(model, cache) for static, cache in caches.items()}
    logits = {static: model(input_ids=prompt, use_cache=True, **forwards[static]).logits[:, -1] for static in caches}
    token = logits[False].argmax(-1, keepdim=True)
    keys, growths = set(), 0
    for step in range(STATIC_CHUNK + 20):
        torch.testing.assert_close(logits[True], logits[False], **tolerance)
        for static, cache in caches.items():  # both read the concatenating cache's greedy token
            logits[static] = model(input_ids=token, use_cache=True, **forwards[static]).logits[:, -1]
        key = caches[True].decode_graph_key()
        growths += key not in keys and bool(keys)
        keys.add(key)
        token = logits[False].argmax(-1, keepdim=True)
    assert caches[False].decode_graph_key() is None
    layer = caches[True].layers[0]
    assert layer.keys.shape[-2] % STATIC_CHUNK == 0 and layer.keys.shape[-2] > layer.logical_len
    assert growths == 1 and caches[True].get_seq_length() == caches[False].get_seq_length()


def test_static_full_cache_gives_the_concatenating_caches_logits():
    check_static_full_cache("cpu", torch.float32, dict(rtol=1e-4, atol=1e-5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_static_full_cache_with_flash_attention_on_cuda():
    """bf16 on CUDA: the filled slots go through flash attention, merged with the masked tail by log-sum-exp.
    Both sides round to bf16 in different places (the concatenating cache runs SDPA over all slots)."""
    check_static_full_cache("cuda", torch.bfloat16, dict(rtol=2e-2, atol=2e-2))


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("filled", [1, 77, 256])
@torch.no_grad()
def test_tail_kernel_gives_the_masked_math_merged_with_the_head(dtype, filled):
    """The static layout's tail kernel against attention over the filled slots alone, computed in fp32 by torch:
    GQA, two sequences, tail slots past the length holding garbage that must not count."""
    from kvreviver_core.kernels.static_tail import tail_attention

    gen = torch.Generator().manual_seed(filled)
    batch, heads, kv_heads, dim, prefix, tail = 2, 8, 2, 64, 320, STATIC_CHUNK
    query = torch.randn(batch, heads, 1, dim, generator=gen).cuda().to(dtype)
    keys = torch.randn(batch, kv_heads, prefix + tail, dim, generator=gen).cuda().to(dtype) * 2
    values = torch.randn(batch, kv_heads, prefix + tail, dim, generator=gen).cuda().to(dtype)
    length = prefix + filled
    scaling = dim ** -0.5

    def attention(n_from: int, n_to: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = keys[:, :, n_from:n_to].float().repeat_interleave(heads // kv_heads, dim=1)
        v = values[:, :, n_from:n_to].float().repeat_interleave(heads // kv_heads, dim=1)
        logits = query.float() @ k.transpose(-1, -2) * scaling
        return logits.softmax(-1) @ v, logits.logsumexp(-1)

    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    device_length = torch.tensor([length], device="cuda")
    tail_only = tail_attention(query, keys[:, :, prefix:], values[:, :, prefix:], 0, device_length - prefix, scaling)
    torch.testing.assert_close(tail_only.float(), attention(prefix, length)[0], **tolerance)
    head_out, head_lse = attention(0, prefix)
    merged = tail_attention(query, keys[:, :, prefix:], values[:, :, prefix:], prefix, device_length, scaling,
                            (head_out.to(dtype), head_lse))
    assert merged.dtype == dtype
    torch.testing.assert_close(merged.float(), attention(0, length)[0], **tolerance)


def test_graphed_decode_refuses_a_model_off_cuda():
    model = tiny_llama()
    cache = make_cache("full", model=model, static=True)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedDecode(model, cache, cache_kwargs(model, cache))


def decode(model, method: str, graphs: bool, steps: int, **options):
    """Prefill two unpadded prompts, then ``steps`` greedy tokens eagerly or through :class:`GraphedDecode`."""
    prompt = torch.randint(3, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1))
    cache = make_cache(method, Budget(0.25, split=SPLITS["wide-vague"]), model=model, **options)
    forward = cache_kwargs(model, cache)
    token = greedy_next(model, prompt.to(next(model.parameters()).device), forward, logits_to_keep=1)
    runner = GraphedDecode(model, cache, forward) if graphs else None
    tokens = []
    for _ in range(steps):
        token = runner.step(token) if runner else greedy_next(model, token, forward)
        tokens.append(token)
    return torch.cat(tokens, dim=1), cache, runner


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("method, options", [("kvreviver", {"estimator": "sum"}), ("kvreviver", {"estimator": "mean"}),
                                             ("kvreviver", {"combine": "mean"}), ("full", {"static": True})],
                         ids=["kvreviver-sum", "kvreviver-mean", "kvreviver-linear", "full-static"])
@torch.no_grad()
def test_replayed_steps_equal_the_eager_steps(method, options):
    """A replay runs the recorded kernels on the same buffers: the tokens and, for KVReviver, every score, exact
    token and bucket equal those of the eager steps, over steps that grow the buffers (new captures)."""
    model = tiny_llama(layers=2, heads=8, kv_heads=2, hidden=256).cuda()
    steps = 250
    eager_tokens, eager, _ = decode(model, method, False, steps, **options)
    graph_tokens, graphed, runner = decode(model, method, True, steps, **options)
    print(method, options, runner.steps)
    assert torch.equal(graph_tokens, eager_tokens)
    # The first step (the store not yet fixed) and each key's first step run eagerly, its second is captured, and
    # the others replay.
    captured = runner.steps["captured"]
    assert captured >= 2 and runner.steps == {"eager": captured + 1, "captured": captured,
                                              "replayed": steps - 2 * captured - 1}
    assert graphed.get_seq_length() == eager.get_seq_length()
    for ours, theirs in zip(graphed.layers, eager.layers):
        if method == "full":
            length = theirs.logical_len  # both static: their capacities hold zeros past the length
            for mine, eagers in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
                assert torch.equal(mine[:, :, :length], eagers[:, :, :length])
            continue
        assert_same_store(ours, theirs, linear=options.get("combine") == "mean")


def assert_same_store(ours, theirs, linear: bool) -> None:
    """Two KVReviver layers hold the same tokens: exact map and parts equal, scores and buckets equal (to
    rounding under the linear combine)."""
    assert bool(ours.sketch.enabled.all()) and int(ours.parts()["vague"].min()) > 0  # Vague part in use
    assert torch.equal(ours.exact_map(), theirs.exact_map())
    if linear:
        # The linear combine's bucket weights are atomic sums, whose order varies from run to run: the
        # outputs, and through them the next steps' scores and buckets, agree to rounding, not to the bit.
        for mine, others in ((ours.scores, theirs.scores), (ours.sketch.keys, theirs.sketch.keys),
                             (ours.sketch.values, theirs.sketch.values)):
            torch.testing.assert_close(mine, others, rtol=1e-4, atol=1e-5)
    else:
        assert torch.equal(ours.scores, theirs.scores)
        assert torch.equal(ours.sketch.keys, theirs.sketch.keys)
        assert torch.equal(ours.sketch.values, theirs.sketch.values)
    assert {k: v.tolist() for k, v in ours.parts().items()} == {k: v.tolist() for k, v in theirs.parts().items()}


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("combine", ["median", "mean"])
@torch.no_grad()
def test_algorithm_3_beside_the_step_gives_the_same_tokens_and_stores(combine, graphs):
    """Algorithm 3 on the side stream (``overlap``, the default) against the same steps with it in line: the
    join before each layer's update must make every read wait for it, and the step must end joined (a capture
    fails otherwise)."""
    model = tiny_llama(layers=3, heads=8, kv_heads=2, hidden=256).cuda()
    steps = 150
    inline_tokens, inline, _ = decode(model, "kvreviver", graphs, steps, combine=combine, overlap=False)
    beside_tokens, beside, runner = decode(model, "kvreviver", graphs, steps, combine=combine)
    assert [layer.followed_on_device for layer in beside.layers] == [True, True, False]
    assert not side_stream._SIDE[torch.device("cuda", torch.cuda.current_device())].pending
    if graphs:
        assert runner.steps["replayed"] > steps // 2
    assert torch.equal(beside_tokens, inline_tokens)
    for ours, theirs in zip(beside.layers, inline.layers):
        assert_same_store(ours, theirs, linear=combine == "mean")
