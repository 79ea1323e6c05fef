"""The model's decoder layers under torch.compile (kvreviver_core/compiled.py) against the same model uncompiled."""

from __future__ import annotations

import pytest
import torch

from kvreviver_core.compiled import compile_token_blocks
from kvreviver_core.kernels import triton_available
from tests.conftest import tiny_llama
from tests.test_graphs import decode


@torch.no_grad()
def test_every_decoder_layer_and_the_final_norm_are_compiled_and_the_model_computes_the_same():
    model = tiny_llama(layers=3)
    prompt = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=prompt).logits
    plain_tokens = decode(model, "kvreviver", False, 12)[0]

    # aot_eager traces the modules as Inductor would, without a C++ toolchain's compile time on the CPU.
    names = compile_token_blocks(model, backend="aot_eager")
    assert set(names) == {f"model.layers.{i}" for i in range(3)} | {"model.norm"}  # not the layers' own norms
    assert all(model.get_submodule(name)._compiled_call_impl is not None for name in names)
    torch.testing.assert_close(model(input_ids=prompt).logits, expected, rtol=1e-5, atol=1e-5)
    compiled_tokens = decode(model, "kvreviver", False, 12)[0]  # prefill and decode shapes both
    assert torch.equal(compiled_tokens, plain_tokens)


@pytest.mark.parametrize("method", ["kvreviver", "full"])
@torch.no_grad()
def test_the_layers_share_their_graphs_and_break_them_at_the_cache(method):
    """The cache's update and the attention function run eagerly between a layer's graphs, and every layer reuses
    them: the graphs that a prefill and decode steps compile do not grow with the number of layers."""
    from torch._dynamo.utils import counters

    graphs = []
    for layers in (2, 5):
        torch._dynamo.reset()
        counters.clear()
        model = tiny_llama(layers=layers)
        plain_tokens = decode(model, method, False, 6)[0]
        compile_token_blocks(model, backend="aot_eager")
        assert torch.equal(decode(model, method, False, 6)[0], plain_tokens)
        breaks = " ".join(counters["graph_break"])
        assert "CompressedCache.update" in breaks and "kvreviver_attention" in breaks
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1]


def test_a_model_without_norms_or_mlps_is_refused():
    with pytest.raises(ValueError, match="nothing to compile"):
        compile_token_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("method, options", [("kvreviver", {"combine": "mean"}), ("full", {"static": True})],
                         ids=["kvreviver-linear", "full-static"])
@torch.no_grad()
def test_inductor_blocks_replayed_from_graphs_give_the_uncompiled_tokens(method, options):
    """Inductor's kernels inside the captured decode steps: the same greedy tokens as the eager, uncompiled model
    (fp32), and the steps did replay."""
    model = tiny_llama(layers=2, heads=8, kv_heads=2, hidden=256).cuda()
    steps = 150
    plain_tokens = decode(model, method, False, steps, **options)[0]
    compile_token_blocks(model)
    compiled_tokens, _, runner = decode(model, method, True, steps, **options)
    print(method, options, runner.steps)
    assert runner.steps["replayed"] >= steps // 2
    assert torch.equal(compiled_tokens, plain_tokens)
