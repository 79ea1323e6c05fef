"""Every method on CUDA (skipped without a GPU): bf16 and fp32, batch > 1 with padding, GQA."""

from __future__ import annotations

import pytest
import torch

from kvreviver_core import list_methods, make_cache
from kvreviver_core.generation import cache_kwargs
from tests.conftest import tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def buildable(model):
    names = []
    for name in list_methods():
        try:
            make_cache(name, 0.25, model=model)
        except ValueError:  # needs a calibration file that this machine does not have
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_every_method_generates_on_cuda_and_matches_full_at_an_unlimited_budget(dtype):
    model = tiny_llama(seed=3).to("cuda", dtype)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 128, (2, 300), generator=gen).cuda()
    mask = torch.ones_like(ids)
    mask[1, :40] = 0  # left padding
    ids[1, :40] = 0
    common = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    full = model.generate(ids, **common, **cache_kwargs(model, make_cache("full", 1.0, model=model)))
    full_logits = torch.stack(full.logits).float()
    for name in buildable(model):
        same = model.generate(ids, **common, **cache_kwargs(model, make_cache(name, 1.0, model=model)))
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        assert (torch.stack(same.logits).float() - full_logits).abs().max() < tolerance, name
        cache = make_cache(name, 0.25, model=model)
        out = model.generate(ids, **common, **cache_kwargs(model, cache))
        assert torch.isfinite(torch.stack(out.logits).float()).all(), name
        if name != "full":
            assert cache.memory_bytes() <= 0.27 * cache.full_bytes(), name
