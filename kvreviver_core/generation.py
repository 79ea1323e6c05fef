"""Greedy generation with a method's cache through the real ``model.generate``: the one runner all tasks share."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from kvreviver_core.budget import Budget
from kvreviver_core.cache import CompressedCache, make_cache
from kvreviver_core.models import is_chat_model


def format_prompt(tokenizer, user_text: str) -> str:
    """Chat models get their chat template (one user turn, generation prompt added); base models the plain text."""
    if is_chat_model(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return user_text


def cache_kwargs(model, cache) -> dict:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); pass it under the name this version takes."""
    params = inspect.signature(type(model).forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


@dataclass
class Generation:
    """One prompt's result. ``memory_bytes``/``full_bytes`` are the batch's, divided evenly between its prompts."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    memory_bytes: float
    full_bytes: float
    seconds: float


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: list[str],
    method: str,
    budget: Budget | float | int,
    max_new_tokens: int,
    **options,
) -> list[Generation]:
    """Greedy-decode ``prompts`` (already formatted) together, left-padded, with a fresh ``method`` cache."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not is_chat_model(tokenizer))
    encoded = {k: v.to(device) for k, v in encoded.items()}
    cache = make_cache(method, budget, model=model, **options)
    start = time.perf_counter()
    output = model.generate(
        **encoded, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=tokenizer.pad_token_id, **cache_kwargs(model, cache),
    )
    seconds = time.perf_counter() - start
    new_tokens = output[:, encoded["input_ids"].shape[1]:]
    return _results(tokenizer, new_tokens, encoded["attention_mask"], cache, seconds)


def _results(tokenizer, new_tokens: torch.Tensor, attention_mask: torch.Tensor, cache: CompressedCache, seconds: float):
    results = []
    n = new_tokens.shape[0]
    memory, full = cache.memory_bytes() / n, cache.full_bytes() / n
    for row, prompt_len in zip(new_tokens.tolist(), attention_mask.sum(dim=1).tolist()):
        ids = _until_eos(row, tokenizer)
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        results.append(Generation(text, ids, int(prompt_len), memory, full, seconds))
    return results


def _until_eos(ids: list[int], tokenizer) -> list[int]:
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids
