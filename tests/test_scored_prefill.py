"""The Triton scored prefill (kvreviver_core/kernels/scored_prefill.py) against softmax attention written out in fp32.

On a CUDA GPU with Triton. Without one, ``TRITON_INTERPRET=1`` runs the same kernels on the CPU through Triton's
interpreter (slow; the shapes here are small): ``TRITON_INTERPRET=1 python -m pytest tests/test_scored_prefill.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from kvreviver_core.kernels import triton_available
from test_attention import direct

if torch.cuda.is_available() and triton_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1" and triton_available():
    DEVICE = "cpu"
else:
    DEVICE = None

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU and Triton (or TRITON_INTERPRET=1)")]

# Against fp32 softmax attention: fp32 inputs are exact products; bf16 inputs are rounded first, then summed in fp32.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
              DEVICE == "cpu", reason="Triton 3.6's interpreter gets bf16 dot products wrong"))]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def inputs(dtype, batch=3, heads=8, kv_heads=2, t=70, n=90, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, t, d, generator=gen)
    key, value = (torch.randn(batch, kv_heads, n, d, generator=gen) for _ in range(2))
    return [x.to(DEVICE, dtype) for x in (query, key, value)]


def causal(t, n):
    return torch.arange(n).view(1, -1) <= torch.arange(n - t, n).view(-1, 1)


def check(query, key, value, mask, score_queries, dtype):
    from kvreviver_core.kernels.scored_prefill import scored_attention_triton

    t, d = query.shape[2], query.shape[3]
    out, scores = scored_attention_triton(query, key, value, mask, d**-0.5, score_queries)
    full = causal(t, key.shape[2]).view(1, 1, t, -1).to(query.device)
    first_scored = 0 if score_queries is None else t - score_queries
    allowed = full if mask is None else mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1) & full
    want_out, want_scores = direct(*(x.float() for x in (query, key, value)), allowed, d**-0.5, first_scored)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(scores, want_scores, rtol=tol, atol=tol)
    torch.testing.assert_close(out.float(), want_out, rtol=tol, atol=tol)
    return out, scores


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("score_queries", [None, 7])
def test_causal_without_mask(dtype, score_queries):
    query, key, value = inputs(dtype)
    _, scores = check(query, key, value, None, score_queries, dtype)
    scored = query.shape[2] if score_queries is None else score_queries
    # Every scored query's probabilities sum to 1, for each of the group's heads.
    assert float(scores.sum()) == pytest.approx(query.shape[0] * query.shape[1] * scored, rel=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_padding_and_a_query_with_nothing_to_attend(dtype):
    query, key, value = inputs(dtype)
    t, n = query.shape[2], key.shape[2]
    mask = causal(t, n).expand(query.shape[0], 1, t, n).clone()
    mask[1, :, :, :29] = False  # a left-padded sequence
    mask[2, :, 5] = False  # a query with nothing to attend
    out, scores = check(query, key, value, mask.to(DEVICE), None, dtype)
    assert float(out[2, 5].abs().max()) == 0.0
    assert float(scores[1, :, :29].abs().max()) == 0.0


@pytest.mark.parametrize("tiles", [(16, 32, 32, 16), (64, 64, 64, 64), (32, 128, 128, 32)],
                         ids=lambda tiles: "rows{}x{}-mass{}x{}".format(*tiles))
def test_per_head_slots_gqa_and_unpadded_head_dim(monkeypatch, tiles):
    """A mask per KV head (slots a method dropped), 3 query heads a group, head_dim 40 (padded to 64 in the
    kernel), a key layout with strides (B, N, Hkv, D) as HF's projections give, and tiles of several shapes, so
    that the diagonal crosses them at different offsets."""
    from kvreviver_core.kernels import scored_prefill

    for name, size in zip(("ROW_BLOCK_M", "ROW_BLOCK_N", "MASS_BLOCK_M", "MASS_BLOCK_N"), tiles):
        monkeypatch.setattr(scored_prefill, name, size)
    dtype = torch.float32
    query, key, value = inputs(dtype, batch=2, heads=6, kv_heads=2, t=150, n=200, d=40, seed=1)
    key = key.transpose(1, 2).contiguous().transpose(1, 2)
    gen = torch.Generator().manual_seed(2)
    mask = causal(150, 200).view(1, 1, 150, 200) & (torch.rand(2, 2, 1, 200, generator=gen) > 0.3)
    check(query, key, value, mask.to(DEVICE), 40, dtype)


class RefusingKernel:
    """A kernel whose launches raise Triton's OutOfResources unless their plan is in ``fits``, as Triton does when
    a compiled kernel needs more shared memory than the GPU has (fp32 at head_dim 128 with the row pass's own plan,
    on any GPU). The plans that ran are kept in ``ran``."""

    def __init__(self, kernel, fits):
        self.kernel, self.fits, self.ran = kernel, fits, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            plan = (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"], meta["num_stages"])
            if plan not in self.fits:
                import triton

                raise triton.OutOfResources(400 * 1024, 227 * 1024, "shared memory")
            self.ran.append(plan)
            return self.kernel[grid](*args, **meta)

        return launch


@pytest.mark.parametrize("fallback_fits", [True, False], ids=["fallback-plan", "torch-path"])
def test_a_plan_the_gpu_cannot_hold_falls_back(monkeypatch, fallback_fits):
    from kvreviver_core.kernels import scored_prefill

    fits = {scored_prefill.FALLBACK_PLAN} if fallback_fits else set()
    kernels = {name: RefusingKernel(getattr(scored_prefill, name), fits) for name in ("_attend_rows", "_column_mass")}
    for name, kernel in kernels.items():
        monkeypatch.setattr(scored_prefill, name, kernel)
    query, key, value = inputs(torch.float32)
    check(query, key, value, None, None, torch.float32)
    want = [scored_prefill.FALLBACK_PLAN] if fallback_fits else []
    assert all(kernel.ran == want for kernel in kernels.values())


def test_is_the_attention_function_on_cuda(monkeypatch):
    """kvreviver_attention routes a scoring layer's prefill here on CUDA, and to the torch path when told not to."""
    from kvreviver_core import attention
    from kvreviver_core.kernels import scored_prefill

    if DEVICE != "cuda":
        pytest.skip("the attention function picks the kernel on CUDA only")
    query = torch.zeros(1, 2, 4, 16, device="cuda")
    assert attention.scored_backend(query) is scored_prefill.scored_attention_triton
    assert attention.scored_backend(query[:, :, :1]) is attention.scored_attention  # a decode step
    monkeypatch.setattr(attention, "FUSED_PREFILL", False)
    assert attention.scored_backend(query) is attention.scored_attention


@torch.no_grad()
def test_generate_keeps_what_the_torch_prefill_keeps(monkeypatch):
    """Through ``model.generate`` on CUDA, in fp32, with padding and GQA, at a budget that makes every method choose
    what to keep: the same tokens and logits with the prefill on the kernels as on the torch path."""
    from kvreviver_core import attention, list_methods, make_cache
    from kvreviver_core.generation import cache_kwargs
    from tests.conftest import tiny_llama

    if DEVICE != "cuda":
        pytest.skip("model.generate on CUDA")
    model = tiny_llama(seed=3).to("cuda", torch.float32)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (2, 300), generator=gen).cuda()
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    ids[1, :40] = 0
    common = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    for name in [name for name in list_methods() if name != "full"]:
        runs = {}
        for fused in (True, False):
            monkeypatch.setattr(attention, "FUSED_PREFILL", fused)
            try:
                cache = make_cache(name, 0.25, model=model)
            except ValueError:  # needs a calibration file that this machine does not have
                break
            runs[fused] = model.generate(ids, **common, **cache_kwargs(model, cache))
        if runs:
            assert torch.equal(runs[True].sequences, runs[False].sequences), name
            gap = (torch.stack(runs[True].logits) - torch.stack(runs[False].logits)).abs().max()
            assert gap < 1e-4, (name, float(gap))
