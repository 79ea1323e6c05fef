"""VECTOR: the full cache at a budget covering the context, approximated values that matter, memory within the budget,
batches with GQA, and the ``kvreviver calibrate`` command (which serves vector and echokv alike).

References: the full cache's logits; plain attention over exactly the tokens held, with their true values (in a
constructed case where every value is an exact linear function of its key, so a correct approximation rebuilds
it); the same attention without the approximated tokens; the base scorer's plain eviction; each prompt run alone.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from kvreviver_core import Budget, make_cache
from kvreviver_core import attention
from kvreviver_core.calibration import (
    RopeFrame, calibrate_on, model_fingerprint, save_calibration, settings_path,
)
from tests.conftest import greedy, left_padded, tiny_llama


def calibration_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (4, 128), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny Llama (GQA 4/2) and its VECTOR calibration on random token ids."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, seed=7)
    return model, calibrate_on("vector", model, calibration_ids(), out=tmp_path_factory.mktemp("vector") / "v.safetensors")


@pytest.mark.parametrize("budget", [1.0, Budget(tokens=4096)])
@pytest.mark.parametrize("scorer", ["h2o", "snapkv"])
@torch.no_grad()
def test_budget_covering_the_context_gives_the_full_cache_logits(calibrated, budget, scorer):
    model, path = calibrated
    _, ids, mask = left_padded((48, 35), seed=0)
    full_seq, full_logits = greedy(model, ids, make_cache("full", 1.0, model=model), mask)
    cache = make_cache("vector", budget, model=model, weights=str(path), scorer=scorer, approx_ratio=0.5)
    seq, logits = greedy(model, ids, cache, mask)
    assert (logits - full_logits).abs().max() < 1e-4
    assert torch.equal(seq, full_seq)


def _drive(cache, keys, values, queries, scaling):
    """Prefill then one decode step through the cache and the registered attention function (layer 0).

    Returns the decode step's output ``(1, 1, Hq, D)`` and the slot positions and retained flags it attended.
    """
    module = SimpleNamespace(layer_idx=0)
    k, v = cache.update(keys[:, :, :-1], values[:, :, :-1], 0)
    attention.kvreviver_attention(module, queries[:, :, :-1], k, v, None, scaling)
    k, v = cache.update(keys[:, :, -1:], values[:, :, -1:], 0)
    layer = cache.layers[0]
    retained = layer.exact_slots() if hasattr(layer, "exact_slots") else layer.filled()
    attended = (layer.positions[0].clone(), retained[0].clone())
    return attention.kvreviver_attention(module, queries[:, :, -1:], k, v, None, scaling)[0], attended


def _masked_reference(query, keys, values, allowed, scaling):
    """Plain attention of one query ``(1, Hq, 1, D)`` over the KV positions ``allowed`` ``(Hkv, N)``, GQA."""
    share = query.shape[1] // keys.shape[1]
    logits = (query @ keys.repeat_interleave(share, 1).transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~allowed.repeat_interleave(share, 0).view(1, -1, 1, keys.shape[2]), float("-inf"))
    return (torch.softmax(logits, dim=-1) @ values.repeat_interleave(share, 1)).transpose(1, 2)


@pytest.mark.parametrize("scorer", ["h2o", "snapkv"])
@torch.no_grad()
def test_approximated_tokens_are_attended_with_their_rebuilt_values(tmp_path, scorer):
    """Constructed case: every value is an exact linear map of its unrotated key, and the weights say so.

    VECTOR's decode output must then equal plain attention over every token it holds, retained or approximated,
    with the true values; ignoring the approximated tokens (attention over the retained ones only) is far from it,
    and further from the full cache, as is plain eviction by the base scorer at the same budget.
    """
    model = tiny_llama(layers=1, heads=4, kv_heads=2)  # its RoPE and its identity; the K/V/Q are made up here
    heads, dim, n = 2, model.config.hidden_size // model.config.num_attention_heads, 480
    gen = torch.Generator().manual_seed(21)
    maps = torch.randn(heads, dim, dim, generator=gen) / dim**0.5
    weight = torch.cat([maps, torch.zeros(heads, 1, dim)], dim=1).unsqueeze(0)  # v = [k, 1] @ W
    path = save_calibration(tmp_path / "exact.safetensors", {"weight": weight, "value_mean": torch.zeros(1, heads, dim)},
                            {"method": "vector", "fingerprint": model_fingerprint(model), "model": "made-up"})
    raw_keys = torch.randn(1, heads, n, dim, generator=gen) * 2
    cos, sin = RopeFrame.of(model).cos_sin(torch.arange(n).view(1, 1, n), torch.float32)
    keys, values = RopeFrame.rotate(raw_keys, cos, sin), torch.einsum("bhnd,hde->bhne", raw_keys, maps)
    # One direction the queries share: the prefill's scores then predict what the decode query attends to.
    queries = torch.randn(1, 4, 1, dim, generator=gen) + 0.3 * torch.randn(1, 4, n, dim, generator=gen)
    scaling = dim**-0.5
    options = dict(recent_share=0.25) if scorer == "h2o" else dict(window=8)
    cache = make_cache("vector", 0.3, model=model, weights=str(path), scorer=scorer, approx_ratio=0.75, **options)
    out, (positions, retained) = _drive(cache, keys, values, queries, scaling)
    held = torch.zeros(heads, n, dtype=torch.bool)
    held.scatter_(1, positions.clamp(min=0).long(), positions >= 0)
    kept_exact = torch.zeros_like(held).scatter_(1, positions.clamp(min=0).long(), (positions >= 0) & retained)
    assert (held & ~kept_exact).sum() > 20, "the case must approximate tokens"
    full = _masked_reference(queries[:, :, -1:], keys, values, torch.ones_like(held), scaling)
    assert (out - _masked_reference(queries[:, :, -1:], keys, values, held, scaling)).abs().max() < 1e-5
    retained_only = _masked_reference(queries[:, :, -1:], keys, values, kept_exact, scaling)
    assert (out - retained_only).abs().max() > 1e-2
    evicted, _ = _drive(make_cache(scorer, 0.3, model=model, **options), keys, values, queries, scaling)
    error = lambda x: float((x - full).norm())  # noqa: E731
    assert error(out) < 0.8 * min(error(retained_only), error(evicted)), (error(out), error(retained_only), error(evicted))


@pytest.mark.parametrize("scorer", ["h2o", "snapkv"])
@torch.no_grad()
def test_ratio_zero_is_exactly_the_base_scorer_and_needs_no_weights(scorer):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, seed=7)
    _, ids, mask = left_padded((70, 52), seed=4)
    _, base = greedy(model, ids, make_cache(scorer, 0.3, model=model), mask)
    _, routed = greedy(model, ids, make_cache("vector", 0.3, model=model, scorer=scorer, approx_ratio=0.0), mask)
    assert torch.equal(routed, base)


@torch.no_grad()
def test_memory_stays_within_the_budget_weights_and_metadata_included(calibrated):
    model, path = calibrated
    # Equal lengths: in a ragged batch every eviction cache pads the shorter rows to the longest, and charges that.
    _, ids, mask = left_padded((300, 300), seed=3)
    for ratio in (0.25, 0.5):  # the default, and more keys than values
        cache = make_cache("vector", 0.25, model=model, weights=str(path), approx_ratio=ratio)
        greedy(model, ids, cache, mask, new_tokens=6)
        prompt_full = 2 * (300 + 300) * cache.layers[0].token_bytes()  # the budget is a share of the prompt's cache
        assert cache.memory_bytes() <= 0.25 * prompt_full, f"ratio {ratio}"
        assert cache.memory_bytes() >= 0.2 * prompt_full, f"ratio {ratio} starves its budget"


@pytest.mark.parametrize("scorer", ["h2o", "snapkv"])
@torch.no_grad()
def test_batch_rows_equal_running_each_prompt_alone_with_gqa(calibrated, scorer):
    model, path = calibrated
    prompts, ids, mask = left_padded((41, 64, 26), seed=8)
    options = dict(weights=str(path), scorer=scorer, approx_ratio=0.5)
    batched, _ = greedy(model, ids, make_cache("vector", 0.4, model=model, **options), mask)
    for i, p in enumerate(prompts):
        solo, _ = greedy(model, p.view(1, -1), make_cache("vector", 0.4, model=model, **options))
        assert torch.equal(batched[i, ids.shape[1]:], solo[0, len(p):]), f"prompt {i}"


def test_bad_options_and_missing_weights_are_clear_value_errors(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="scorer"):
        make_cache("vector", 0.5, model=tiny_model, scorer="cam", approx_ratio=0.0)
    with pytest.raises(ValueError, match="approx_ratio"):
        make_cache("vector", 0.5, model=tiny_model, approx_ratio=1.0)
    with pytest.raises(ValueError, match="kvreviver calibrate --method vector"):
        make_cache("vector", 0.5, model=tiny_model, weights=str(tmp_path / "none.safetensors"))


# -- the calibrate command ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny Llama and a character-level tokenizer, saved with save_pretrained as a user's local model."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, **{chr(i): i for i in range(4, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        bos_token="<s>", eos_token="</s>")
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def invoke(args: list[str]):
    from kvreviver_cli.app import app

    return CliRunner().invoke(app, ["calibrate", *args])


@pytest.mark.parametrize("method, extra", [("vector", []), ("echokv", ["--steps", "3", "--keep", "0.5"])])
def test_calibrate_command_writes_weights_and_settings(saved_tiny, tmp_path, method, extra):
    out = tmp_path / f"{method}.safetensors"
    result = invoke(["--method", method, "--model", str(saved_tiny), "--device", "cpu", "--tokens", "1024",
                     "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    settings = json.loads(settings_path(out).read_text())
    assert settings["method"] == method and settings["tokens"] == 1024
    assert settings["text"].startswith("builtin:pydoc_data.topics")
    from kvreviver_core.models import load_model

    model, _ = load_model(str(saved_tiny), dtype="float32", device="cpu")
    make_cache(method, 0.6, model=model, weights=str(out))  # the file is what make_cache reads


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "h2o"], "--method"),
        (["--method", "vector", "--steps", "5"], "closed form"),
        (["--method", "vector", "--keep", "0.5"], "echokv options"),
        (["--method", "echokv", "--steps", "0"], "steps"),
        (["--method", "echokv", "--keep", "1.5"], "keep"),
        (["--method", "vector", "--text", "/no/such/file.txt"], "--text"),
        (["--method", "vector", "--out", "weights.bin"], ".safetensors"),
        (["--method", "vector", "--tokens", "100"], "2 chunks"),
        (["--method", "echokv", "--local-size", "0"], "--local-size"),
    ],
)
def test_calibrate_bad_input_exits_2_with_one_line(saved_tiny, tmp_path, args, message):
    tokens = [] if "--tokens" in args else ["--tokens", "1024"]
    result = invoke([*args, "--model", str(saved_tiny), "--device", "cpu", *tokens])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_calibrate_with_a_missing_model_folder_exits_2(tmp_path):
    result = invoke(["--method", "vector", "--model", str(tmp_path / "nothing-here"), "--device", "cpu"])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert len(result.output.strip().splitlines()) == 1
