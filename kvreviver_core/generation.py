"""Greedy generation with a method's cache through the real ``model.generate``: the one runner all tasks share.

Two ways to present a prompt:

* in-prompt (a formatted string): the whole prompt is prefilled at once, so a query-aware method sees the question
  while it chooses what to keep;
* question after context (a :class:`SplitPrompt`): the context alone is prefilled through the method's cache, which
  compresses it then; the question and the generation prompt follow as a continuation through that compressed cache.
  The two token runs concatenate to exactly the token ids of the in-prompt mode, so with the full cache both modes
  compute the same thing.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from kvreviver_core.budget import Budget
from kvreviver_core.cache import CompressedCache, make_cache
from kvreviver_core.models import is_chat_model


def greedy_next(model: torch.nn.Module, input_ids: torch.Tensor, forward: dict, **kwargs) -> torch.Tensor:
    """One forward pass through the cache in ``forward`` (:func:`cache_kwargs`): each sequence's greedy next token,
    ``(B, 1)``. The decode step that ``profile`` times, shared by the benchmarks that take it apart."""
    return model(input_ids=input_ids, use_cache=True, **forward, **kwargs).logits[:, -1].argmax(dim=-1, keepdim=True)


def format_prompt(tokenizer, user_text: str) -> str:
    """Chat models get their chat template (one user turn, generation prompt added); base models the plain text."""
    if is_chat_model(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return user_text


@dataclass(frozen=True)
class SplitPrompt:
    """A prompt cut in two token runs: ``context_ids`` (prefilled and compressed alone), then ``question_ids``.

    ``context_ids + question_ids`` are exactly the token ids of the formatted prompt ``context + separator +
    question`` (see :func:`split_prompts`).
    """

    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.context_ids or not self.question_ids:
            raise ValueError("a split prompt needs a non-empty context and a non-empty question")


def split_prompts(tokenizer, context: str, questions: Sequence[str], separator: str = "\n\n") -> list[SplitPrompt]:
    """Format one user turn ``context + separator + question`` per question and cut its token ids after the context.

    How the cut is made: the formatted prompt (chat template applied to the single user turn) is tokenized whole,
    and so is its text up to the end of the context. The cut is the longest run of leading token ids that both
    tokenizations share (and that all questions share), so the context run never holds a token that covers any
    character of the separator or the question; a token that straddles the boundary goes to the question run.
    Every split prompt of one call has the same ``context_ids``.
    """
    if not questions:
        raise ValueError("split_prompts needs at least one question")
    add_special = not is_chat_model(tokenizer)
    full_ids = []
    boundary_text = None
    for question in questions:
        user_text = context + separator + question
        formatted = format_prompt(tokenizer, user_text)
        start = formatted.find(user_text)
        if start < 0:
            raise ValueError("the chat template rewrites the user text; the prompt cannot be split after the context")
        prefix = formatted[: start + len(context)]
        if boundary_text is not None and prefix != boundary_text:
            raise ValueError("the chat template formats the context differently for different questions")
        boundary_text = prefix
        full_ids.append(tokenizer(formatted, add_special_tokens=add_special)["input_ids"])
    cut = _common_prefix_length([tokenizer(boundary_text, add_special_tokens=add_special)["input_ids"], *full_ids])
    return [SplitPrompt(tuple(ids[:cut]), tuple(ids[cut:])) for ids in full_ids]


def _common_prefix_length(sequences: list[list[int]]) -> int:
    length = min(len(s) for s in sequences)
    for i in range(length):
        if any(s[i] != sequences[0][i] for s in sequences[1:]):
            return i
    return length


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
    prompts: Sequence[str] | Sequence[SplitPrompt],
    method: str,
    budget: Budget | float | int,
    max_new_tokens: int,
    **options,
) -> list[Generation]:
    """Greedy-decode ``prompts`` together, left-padded, with a fresh ``method`` cache.

    ``prompts`` are formatted strings (in-prompt mode), or :class:`SplitPrompt` items (question after context): then
    the contexts are prefilled and compressed first, and the questions follow as a continuation. Split prompts are
    batched by question length (a batch shares one cache, and its questions must line up after the padded contexts).
    """
    if prompts and all(isinstance(p, SplitPrompt) for p in prompts):
        return _generate_split_batch(model, tokenizer, list(prompts), method, budget, max_new_tokens, **options)
    if any(isinstance(p, SplitPrompt) for p in prompts):
        raise ValueError("prompts must be all formatted strings or all SplitPrompt, not a mix")
    device = next(model.parameters()).device
    add_special = not is_chat_model(tokenizer)
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=add_special)
    encoded = {k: v.to(device) for k, v in encoded.items()}
    cache = make_cache(method, budget, model=model, **options)
    start = time.perf_counter()
    new_tokens = _generate(model, tokenizer, cache, encoded["input_ids"], encoded["attention_mask"], max_new_tokens)
    seconds = time.perf_counter() - start
    return _results(tokenizer, new_tokens, encoded["attention_mask"].sum(dim=1).tolist(), cache, seconds)


def _generate_split_batch(model, tokenizer, prompts: list[SplitPrompt], method, budget, max_new_tokens, **options):
    by_question_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_question_length[len(prompt.question_ids)].append(index)
    results: list[Generation | None] = [None] * len(prompts)
    for indices in by_question_length.values():
        group = [prompts[i] for i in indices]
        context_ids, context_mask = _left_pad([list(p.context_ids) for p in group], tokenizer, model)
        question_ids = torch.tensor([list(p.question_ids) for p in group], dtype=torch.long, device=context_ids.device)
        cache = make_cache(method, budget, model=model, **options)
        start = time.perf_counter()
        prefill_context(model, cache, context_ids, context_mask)
        input_ids = torch.cat([context_ids, question_ids], dim=1)
        mask = torch.cat([context_mask, torch.ones_like(question_ids)], dim=1)
        new_tokens = _generate(model, tokenizer, cache, input_ids, mask, max_new_tokens)
        seconds = time.perf_counter() - start
        for i, result in zip(indices, _results(tokenizer, new_tokens, mask.sum(dim=1).tolist(), cache, seconds)):
            results[i] = result
    return results


@torch.no_grad()
def generate_after_context(
    model,
    tokenizer,
    prompts: Sequence[SplitPrompt],
    method: str,
    budget: Budget | float | int,
    max_new_tokens: int,
    after_context: Callable[[CompressedCache], None] | None = None,
    **options,
) -> list[Generation]:
    """Several questions on one context: prefill and compress the context once, then answer each question.

    Each question starts from a deep copy of the cache as it was right after the context, so no question or answer
    leaks into the next. ``after_context(cache)``, if given, is called once the context is compressed and before any
    question token is fed (to inspect what the method kept). ``seconds`` of a result is its question's time plus an
    equal share of the context's prefill.
    """
    if not prompts:
        return []
    context = prompts[0].context_ids
    if any(p.context_ids != context for p in prompts):
        raise ValueError("generate_after_context needs prompts that share one context (use split_prompts)")
    context_ids, context_mask = _left_pad([list(context)], tokenizer, model)
    cache = make_cache(method, budget, model=model, **options)
    start = time.perf_counter()
    prefill_context(model, cache, context_ids, context_mask)
    prefill_seconds = time.perf_counter() - start
    if after_context is not None:
        after_context(cache)
    results = []
    for prompt in prompts:
        question_cache = copy.deepcopy(cache)
        input_ids = torch.cat([context_ids, context_ids.new_tensor([prompt.question_ids])], dim=1)
        mask = torch.ones_like(input_ids)
        start = time.perf_counter()
        new_tokens = _generate(model, tokenizer, question_cache, input_ids, mask, max_new_tokens)
        seconds = time.perf_counter() - start + prefill_seconds / len(prompts)
        results.extend(_results(tokenizer, new_tokens, [input_ids.shape[1]], question_cache, seconds))
    return results


def prefill_context(model, cache: CompressedCache, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Run the context ``(batch, seq)`` through ``cache`` alone: the method compresses it here.

    Positions count non-padding tokens only, as ``generate`` numbers them, so the continuation lines up.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
          logits_to_keep=1, **cache_kwargs(model, cache))


def _generate(model, tokenizer, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int):
    """Greedy ``model.generate`` through ``cache``; tokens already in the cache are not fed again. New tokens only."""
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
        num_beams=1, pad_token_id=tokenizer.pad_token_id, **cache_kwargs(model, cache),
    )
    return output[:, input_ids.shape[1]:]


def _left_pad(rows: list[list[int]], tokenizer, model) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def _results(tokenizer, new_tokens: torch.Tensor, prompt_lengths: list[int], cache: CompressedCache, seconds: float):
    results = []
    n = new_tokens.shape[0]
    memory, full = cache.memory_bytes() / n, cache.full_bytes() / n
    for row, prompt_len in zip(new_tokens.tolist(), prompt_lengths):
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
