"""EchoKV: training lowers the held-out error, exact reconstruction when the dropped heads are linear in the kept ones,
the full cache's logits when every head is kept, memory within the budget, and clear errors.

References: the full cache's logits; hand-written weights that rebuild a head exactly (the model is built so that
they do); the relative error of predicting the mean (1), which a broken gradient cannot improve on.
"""

from __future__ import annotations

import pytest
import torch

from kvreviver_core import make_cache
from kvreviver_core.calibration import (
    calibrate_on, load_calibration, model_fingerprint, save_calibration, settings_path,
)
from kvreviver_core.generation import cache_kwargs
from kvreviver_core.methods.echokv import EchoPlan
from tests.conftest import tiny_llama


def left_padded(lengths: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, 128, (n,), generator=gen)
        mask[i, width - n:] = 1
    return ids, mask


def greedy(model, ids, mask, cache, new_tokens=6):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, **cache_kwargs(model, cache))
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A 4-layer tiny Llama (GQA 4/2) and EchoKV weights briefly trained on random token ids (keep 0.4)."""
    model = tiny_llama(layers=4)
    ids = torch.randint(3, 128, (4, 128), generator=torch.Generator().manual_seed(0))
    path = calibrate_on("echokv", model, ids, steps=10, out=tmp_path_factory.mktemp("echokv") / "w.safetensors",
                        keep=0.4)
    return model, path


@torch.no_grad()
def test_every_head_kept_gives_the_full_cache_logits(calibrated):
    model, path = calibrated
    ids, mask = left_padded((40, 27), seed=1)
    full_seq, full_logits = greedy(model, ids, mask, make_cache("full", 1.0, model=model))
    seq, logits = greedy(model, ids, mask, make_cache("echokv", 1.0, model=model, weights=str(path)))
    assert (logits - full_logits).abs().max() < 1e-4
    assert torch.equal(seq, full_seq)


def _linked_model_and_weights(tmp_path, scale: float):
    """A tiny Llama whose dropped heads are exact linear maps of the kept ones, and weights doing that map.

    Plan (2 layers, 2 KV heads, keep 1/2, S = 2, m = 1): layer 0 keeps head 0, layer 1 keeps head 1. The dropped
    head's pre-RoPE key is ``P k`` (P random, so it does not commute with the rotations and wrong positions would
    show) and its value ``Q v``. ``scale`` multiplies the written weights: 1 rebuilds exactly, 0 rebuilds nothing.
    """
    model = tiny_llama(layers=2, heads=4, kv_heads=2, seed=3)
    plan = EchoPlan(layers=2, heads=2, keep=0.5, group_size=2, local_size=1)
    dim = model.config.hidden_size // model.config.num_attention_heads
    gen = torch.Generator().manual_seed(4)
    tensors = {"kept": plan.kept(), "unit_error": torch.zeros(2, 2, 2)}
    for layer, block in enumerate(model.model.layers):
        kept, dropped = [h for h in range(2) if plan.kept()[layer, h]][0], plan.outputs(layer, 0)[0]
        for kind, proj in (("k", block.self_attn.k_proj), ("v", block.self_attn.v_proj)):
            mix = torch.linalg.qr(torch.randn(dim, dim, generator=gen))[0]
            rows = proj.weight.data
            rows[dropped * dim:(dropped + 1) * dim] = mix @ rows[kept * dim:(kept + 1) * dim]
            tensors[f"{kind}.{layer}.0.weight"] = scale * mix.T  # rows are features: y = x @ W
            tensors[f"{kind}.{layer}.0.bias"] = torch.zeros(dim)
    settings = {"method": "echokv", "fingerprint": model_fingerprint(model), "model": "linked", **plan.settings()}
    return model, save_calibration(tmp_path / f"linked{scale}.safetensors", tensors, settings)


@torch.no_grad()
def test_exact_weights_rebuild_dropped_heads_exactly_in_a_padded_batch(tmp_path):
    model, path = _linked_model_and_weights(tmp_path, scale=1.0)
    ids, mask = left_padded((60, 43), seed=5)
    full_seq, full_logits = greedy(model, ids, mask, make_cache("full", 1.0, model=model))
    cache = make_cache("echokv", 0.75, model=model, weights=str(path))
    seq, logits = greedy(model, ids, mask, cache)
    for layer in cache.layers:  # the dropped head really was dropped and rebuilt
        assert layer.exact_heads == {"k": [layer.layer_idx], "v": [layer.layer_idx]}
    assert (logits - full_logits).abs().max() < 1e-4
    assert torch.equal(seq, full_seq)
    # The same cache with the rebuilding switched off (zero weights) is far off: the check above can fail.
    model, zero_path = _linked_model_and_weights(tmp_path, scale=0.0)
    _, zero_logits = greedy(model, ids, mask, make_cache("echokv", 0.75, model=model, weights=str(zero_path)))
    assert (zero_logits - full_logits).abs().max() > 1e-2


def test_training_takes_the_heldout_error_from_the_mean_predictor_to_near_zero(tmp_path):
    """On the linked model an exact linear rebuild exists, so training must find it; a broken gradient cannot."""
    model, _ = _linked_model_and_weights(tmp_path, scale=1.0)
    ids = torch.randint(3, 128, (8, 128), generator=torch.Generator().manual_seed(8))
    path = calibrate_on("echokv", model, ids, steps=60, out=tmp_path / "trained.safetensors",
                        keep=0.5, group_size=2, local_size=1)
    _, settings = load_calibration(path, "echokv", model)
    losses = settings["heldout_loss"]
    # At the start every dropped head is predicted by its training mean: relative error ~1 by construction.
    assert 0.9 < losses["start"]["kv"] < 1.1
    assert losses["stage1"]["kv"] < 0.05  # stage 1: MSE of the rebuilt K/V
    assert losses["stage2"]["attention"] < 0.1 * losses["start"]["attention"]  # stage 2: MSE of the attention output
    ids, mask = left_padded((50, 31), seed=9)
    full_seq, full_logits = greedy(model, ids, mask, make_cache("full", 1.0, model=model))
    _, logits = greedy(model, ids, mask, make_cache("echokv", 0.75, model=model, weights=str(path)))
    assert (logits - full_logits).abs().max() < 0.05 * full_logits.abs().max()


@torch.no_grad()
def test_memory_at_half_budget_stays_within_it_while_decoding(calibrated):
    model, path = calibrated
    ids, mask = left_padded((300, 260), seed=6)
    cache = make_cache("echokv", 0.5, model=model, weights=str(path))
    greedy(model, ids, mask, cache, new_tokens=6)
    assert cache.memory_bytes() <= 0.5 * cache.full_bytes()
    assert cache.memory_bytes() >= 0.4 * cache.full_bytes(), "the budget left over should keep extra heads exactly"


def test_missing_weights_file_is_one_line_naming_the_calibrate_command(tiny_model, tmp_path):
    with pytest.raises(ValueError) as info:
        make_cache("echokv", 0.5, model=tiny_model, weights=str(tmp_path / "none.safetensors"))
    message = str(info.value)
    assert "kvreviver calibrate --method echokv" in message and "\n" not in message


@torch.no_grad()
def test_budget_below_the_kept_heads_and_weights_is_a_clear_error(calibrated):
    model, path = calibrated
    ids, mask = left_padded((64,), seed=7)
    with pytest.raises(ValueError, match="calibrate with a smaller --keep"):
        model(ids, attention_mask=mask, **cache_kwargs(model, make_cache("echokv", 0.3, model=model, weights=str(path))))


def test_weights_of_another_model_are_refused(calibrated, tmp_path):
    _, path = calibrated
    other = tiny_llama(layers=4, seed=11)
    with pytest.raises(ValueError, match="another model"):
        make_cache("echokv", 0.5, model=other, weights=str(path))
    assert settings_path(path).exists()
