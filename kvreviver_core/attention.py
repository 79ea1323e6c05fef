"""The attention function that every compressed cache runs through.

transformers only returns attention weights on its eager path, and never hands the cache to the attention
function. We register one function, ``"kvreviver"``, through ``AttentionInterface``. The cache's ``update``
announces which layer is being computed (:func:`announce_layer`); the function then asks that layer:

* for an extra mask over its stored slots (empty slots, or tokens a method has dropped);
* whether it wants attention scores, and over which queries (all of them, or an observation window);
* whether it computes attention itself (a fused decode kernel).

Scores are softmax(QK^T) summed over the queries asked for and over the query heads of each KV-head group,
``(batch, kv_heads, kv_len)`` in fp32. On CUDA a prefill takes them from Triton kernels that keep the logits in
registers (:mod:`kvreviver_core.kernels.scored_prefill`); elsewhere :func:`scored_attention` processes the queries
in chunks, so no N x N matrix is ever built for more than one chunk at a time. Without a compressed layer the
function is plain SDPA.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvreviver_core.ops import accumulation_dtype

if TYPE_CHECKING:
    from kvreviver_core.methods.base import CompressedLayer

ATTENTION_NAME = "kvreviver"
# Elements of one chunk's fp32 logits (batch * heads * chunk * kv_len): 64 Mi elements is 256 MB.
CHUNK_ELEMENTS = 64 * 1024 * 1024

# A scoring layer's prefill on CUDA runs the Triton kernels of kernels/scored_prefill.py (no logits in memory);
# False keeps the torch path below, which also serves the CPU and decode steps.
FUSED_PREFILL = True

_announced = threading.local()
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def announce_layer(layer_idx: int, layer: "CompressedLayer") -> None:
    """Called by the cache's update: the next attention call for ``layer_idx`` belongs to ``layer``."""
    if not hasattr(_announced, "layers"):
        _announced.layers = {}
    _announced.layers[layer_idx] = layer


def _take_layer(layer_idx: int | None) -> "CompressedLayer | None":
    layers = getattr(_announced, "layers", None)
    if not layers or layer_idx is None:
        return None
    return layers.pop(layer_idx, None)


def _boolean_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """HF gives a bool mask (sdpa style, True = attend) or an additive float mask; return bool."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def combined_mask(
    attention_mask: torch.Tensor | None, slot_mask: torch.Tensor | None, q_len: int, kv_len: int, device
) -> torch.Tensor | None:
    """HF's causal/padding mask AND the layer's slot mask, bool. None if plain causal.

    ``slot_mask`` is ``(B, N)`` or, when KV heads hold different tokens, ``(B, Hkv, N)``; the result is
    ``(B, 1, q_len, kv_len)`` or ``(B, Hkv, q_len, kv_len)`` accordingly.
    """
    mask = _boolean_mask(attention_mask)
    if mask is not None:
        mask = mask[..., -kv_len:]
    if slot_mask is None:
        return mask
    if mask is None:
        # HF skipped the mask (plain causal). Rebuild the causal part for the new tokens at the end.
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device).view(-1, 1)
        mask = (torch.arange(kv_len, device=device).view(1, -1) <= q_pos).view(1, 1, q_len, kv_len)
    per_head = slot_mask.view(slot_mask.shape[0], -1, slot_mask.shape[-1])  # (B, 1 or Hkv, N)
    slot = torch.ones(*per_head.shape[:2], kv_len, dtype=torch.bool, device=device)
    slot[..., : per_head.shape[-1]] = per_head
    return mask & slot.unsqueeze(2)


def scored_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    score_queries: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention that also returns the column sums of its probabilities.

    Args:
        query: ``(B, Hq, T, D)``; key, value: ``(B, Hkv, N, D)`` (not repeated for GQA).
        mask: ``(B, 1, T, N)`` bool or None (then causal with the queries at the end).
        score_queries: sum the probabilities of the last ``score_queries`` queries only (None = all).

    Returns:
        output ``(B, T, Hq, D)`` (HF's layout after attention) and scores ``(B, Hkv, N)`` fp32.
    """
    b, hq, t, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    group = hq // hkv
    first_scored = 0 if score_queries is None else max(0, t - score_queries)
    out = torch.empty(b, hkv, group, t, value.shape[-1], dtype=query.dtype, device=query.device)
    scores = torch.zeros(b, hkv, n, dtype=torch.float32, device=query.device)
    if first_scored:
        # Queries whose probabilities nobody asked for (before an observation window) take the fused SDPA path.
        early = _sdpa(query[:, :, :first_scored], key, value, _rows(mask, 0, first_scored, t, n, query.device), scaling)
        out[:, :, :, :first_scored] = early.transpose(1, 2).reshape(b, hkv, group, first_scored, -1)
    q = query.view(b, hkv, group, t, d)
    wide = accumulation_dtype(query.dtype)  # the softmax
    k_t = key.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, 1, D, N)
    v = value.unsqueeze(2)
    # Every chunk reads all the keys and values of its sequences. With the whole batch in each chunk, a chunk holds
    # fewer queries as the batch grows, and that re-read grows with the batch squared. So a chunk takes as few
    # sequences as fill it (one, at long contexts) and as many of their queries as fit.
    scored = t - first_scored
    sequences = max(1, min(b, CHUNK_ELEMENTS // max(1, hq * n * scored)))
    chunk = max(1, CHUNK_ELEMENTS // max(1, sequences * hq * n))
    for first in range(0, b, sequences):
        rows = slice(first, min(b, first + sequences))
        for start in range(first_scored, t, chunk):
            stop = min(t, start + chunk)
            logits = torch.matmul(q[rows, :, :, start:stop], k_t[rows]).to(wide).mul_(scaling)  # (b', Hkv, G, c, N)
            allowed = _rows(mask, start, stop, t, n, query.device)  # (B or 1, 1 or Hkv, c, N)
            allowed = (allowed[rows] if allowed.shape[0] > 1 else allowed).unsqueeze(2)
            probs = torch.softmax(logits.masked_fill_(~allowed, float("-inf")), dim=-1)
            if mask is not None:  # fully masked rows (padding queries) give NaN, to be 0; causal rows see themselves
                probs.nan_to_num_(0.0)
            out[rows, :, :, start:stop] = torch.matmul(probs.to(value.dtype), v[rows])
            scores[rows] += probs.sum(dim=(2, 3))
    return out.view(b, hq, t, -1).transpose(1, 2), scores


def _rows(mask: torch.Tensor | None, start: int, stop: int, t: int, n: int, device) -> torch.Tensor:
    """Rows ``start:stop`` of the (B, 1, T, N) bool mask; causal with the queries at the end when ``mask`` is None."""
    if mask is not None:
        return mask[:, :, start:stop]
    q_pos = torch.arange(n - t + start, n - t + stop, device=device).view(-1, 1)
    return (torch.arange(n, device=device).view(1, -1) <= q_pos).view(1, 1, stop - start, n)


def _sdpa(query, key, value, mask, scaling) -> torch.Tensor:
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
        if mask is not None and mask.shape[1] > 1:
            mask = mask.repeat_interleave(group, dim=1)
    t, n = query.shape[2], key.shape[2]
    causal = mask is None and t > 1
    if causal and n != t:
        q_pos = torch.arange(n - t, n, device=query.device).view(-1, 1)
        mask = (torch.arange(n, device=query.device).view(1, -1) <= q_pos).view(1, 1, t, n)
        causal = False
    if mask is not None:
        # Rows with nothing to attend (padding queries) would give NaN, which then leaks through 0 * NaN.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    if query.is_cuda:
        # cuDNN attention builds a new plan for every key length, i.e. at every decode step (~40 ms, see
        # BENCHMARKS.md); the other backends need no planning.
        with sdpa_kernel(_CUDA_SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scaling)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scaling)
    return out.transpose(1, 2)


@torch.compiler.disable  # eager inside a compiled decoder layer, as the cache's update (kvreviver_core.compiled)
def kvreviver_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The registered attention function (signature of transformers' AttentionInterface)."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = _take_layer(getattr(module, "layer_idx", None))
    t, n = query.shape[2], key.shape[2]
    if layer is None:
        return _sdpa(query, key, value, combined_mask(attention_mask, None, t, n, query.device), scaling), None
    mask = combined_mask(attention_mask, layer.slot_mask(), t, n, query.device)
    fused = layer.fused_attention(query, key, value, mask, scaling)
    if fused is not None:
        return fused, None
    score_queries = layer.score_queries(t)
    if score_queries == 0:
        out = _sdpa(query, key, value, mask, scaling)
        layer.observe(None, _key_validity(mask, key))
        return out, None
    out, scores = scored_backend(query)(query, key, value, mask, scaling, score_queries)
    layer.observe(scores, _key_validity(mask, key))
    return out, None


def scored_backend(query: torch.Tensor) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """What computes a scoring layer's attention for ``query`` ``(B, Hq, T, D)``: the Triton kernels for a prefill
    (``T > 1``) on CUDA, else :func:`scored_attention`."""
    from kvreviver_core.kernels import triton_available

    if FUSED_PREFILL and query.is_cuda and query.shape[2] > 1 and triton_available():
        from kvreviver_core.kernels.scored_prefill import scored_attention_triton

        return scored_attention_triton
    return scored_attention


def _key_validity(mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the columns the last query may attend (padding and dropped slots are False)."""
    if mask is None:
        return torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device)
    return mask[:, :, -1, :].any(dim=1).expand(key.shape[0], -1)


_registered = False


def register_attention() -> str:
    """Register the attention function and its mask builder with transformers (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, kvreviver_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        _registered = True
    return ATTENTION_NAME


def use_on(model: torch.nn.Module) -> None:
    """Make ``model`` run its attention through :func:`kvreviver_attention` (no-op when it already does)."""
    name = register_attention()
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == name:
        return
    setter: Callable | None = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise ValueError(f"{type(model).__name__} does not support set_attn_implementation; cannot attach the cache")
    setter(name)
