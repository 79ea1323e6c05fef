"""Shared fixtures: a tiny random Llama (GQA) built in the test, and the embedded SmolLM2 loaded once."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvreviver_core.generation import cache_kwargs


def pytest_configure(config) -> None:
    """Give the tests a cache folder of their own, so that calibrations a user made (``kvreviver calibrate``) never
    change what the tests see, and the tests never write into the user's cache. The user's converted models are
    linked in, not converted again."""
    from kvreviver_core.models import cache_dir

    user_cache = cache_dir()
    test_cache = Path(tempfile.mkdtemp(prefix="kvreviver-test-cache-"))
    if user_cache.is_dir():
        for converted in user_cache.glob("*-bf16"):
            (test_cache / converted.name).symlink_to(converted.resolve(), target_is_directory=True)
    os.environ["KVREVIVER_CACHE"] = str(test_cache)
    config.kvreviver_test_cache = test_cache


def pytest_unconfigure(config) -> None:
    test_cache = getattr(config, "kvreviver_test_cache", None)
    if test_cache is not None:
        shutil.rmtree(test_cache, ignore_errors=True)  # unlinks the linked models, never their targets


def tiny_llama(layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 64, vocab: int = 128, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct in fp32 on the CPU; skipped if not installed."""
    from kvreviver_core import models

    try:
        model, tokenizer = models.load_model(None, dtype="float32", device="cpu")
    except models.ModelUnavailable as exc:
        pytest.skip(str(exc))
    return model, tokenizer


def left_padded(lengths: tuple[int, ...], seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Random prompts of these lengths, and their left-padded batch: (prompts, ids, attention mask)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 128, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return prompts, ids, mask


def greedy(model, ids, cache, mask=None, new_tokens=8):
    """Greedy ``generate`` with ``cache``: (sequences, logits ``(batch, new_tokens, vocab)``)."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, **cache_kwargs(model, cache))
    return out.sequences, torch.stack(out.logits, dim=1)
