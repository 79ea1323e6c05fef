"""Pure-torch reference of the fused KVReviver decode attention (same signature as the Triton kernel).

One decode step (a single query per sequence) attends over the compressed store directly:

* the exact slots (Recent and Candidate), ``exact_keys/exact_values`` ``(B, Hkv, E, D)`` at the positions
  ``exact_pos`` ``(B, Hkv, E)`` (int32, -1 = empty slot);
* every other attendable position, reconstructed from the Vague sketch with :meth:`VagueSketch.query` (the
  same hashes, median of rows and signs as :meth:`ReviverLayer.revive`).

It reconstructs the Vague tokens in chunks of positions, so the full K/V of the context never exist at once. The
result equals ``revive()`` followed by exact attention, and the returned mass is what that attention would feed
the cumulative scores: softmax probabilities summed over the query heads of each KV group. Whatever the store's
dtype, logits, softmax and the weighted sum of values are computed in fp32 from the stored (and reconstructed)
values, as the kernel accumulates them; only the output is cast back.
"""

from __future__ import annotations

import torch

from kvreviver_core.ops import accumulation_dtype
from kvreviver_core.sketch import VagueSketch

# Positions reconstructed from the sketch per chunk: bounds the reference's transient memory.
CHUNK_POSITIONS = 8192


def check_decode_inputs(
    query: torch.Tensor,
    exact_keys: torch.Tensor,
    exact_values: torch.Tensor,
    exact_pos: torch.Tensor,
    sketch: VagueSketch | None,
    key_valid: torch.Tensor,
) -> None:
    """Raise ValueError unless the shapes describe one decode step over one layer's compressed store."""
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"decode attention takes one query per sequence (B, Hq, 1, D), got {tuple(query.shape)}")
    b, hq, _, d = query.shape
    if exact_keys.shape != exact_values.shape or exact_keys.dim() != 4:
        raise ValueError(f"exact keys {tuple(exact_keys.shape)} and values {tuple(exact_values.shape)} must match")
    kb, hkv, e, kd = exact_keys.shape
    if kb != b or kd != d or hq % max(hkv, 1) != 0:
        raise ValueError(f"query {tuple(query.shape)} does not fit the exact store {tuple(exact_keys.shape)}")
    if tuple(exact_pos.shape) != (b, hkv, e):
        raise ValueError(f"exact_pos must be {(b, hkv, e)}, got {tuple(exact_pos.shape)}")
    if key_valid.dim() != 2 or key_valid.shape[0] != b:
        raise ValueError(f"key_valid must be (batch, length), got {tuple(key_valid.shape)}")
    if sketch is not None and tuple(sketch.keys.shape[:2]) != (b, hkv):
        raise ValueError(f"sketch {tuple(sketch.keys.shape)} does not match the exact store {(b, hkv)}")


def exact_position_map(exact_pos: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, Hkv, length)`` bool: positions held in the exact store."""
    b, h, _ = exact_pos.shape
    held = torch.zeros(b, h, length + 1, dtype=torch.bool, device=exact_pos.device)
    held.scatter_(2, torch.where(exact_pos >= 0, exact_pos.long(), length), True)
    return held[:, :, :length]


def reviver_decode_reference(
    query: torch.Tensor,
    exact_keys: torch.Tensor,
    exact_values: torch.Tensor,
    exact_pos: torch.Tensor,
    sketch: VagueSketch | None,
    key_valid: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one new token per sequence over the compressed store, and the attention mass of each position.

    Args:
        query: ``(B, Hq, 1, D)``; Hq is a multiple of Hkv (GQA).
        exact_keys, exact_values: ``(B, Hkv, E, D)``, the exact store.
        exact_pos: ``(B, Hkv, E)`` int, the position of each exact slot, -1 for an empty slot.
        sketch: the Vague part, or None (then only the exact slots are attended). Sequences whose sketch has no
            bucket (``sketch.enabled`` False) attend to their exact slots only.
        key_valid: ``(B, L)`` bool, the positions the query may attend (False for left padding); L is the
            layer's logical length, the new token included.
        scaling: softmax scale.

    Returns:
        output ``(B, 1, Hq, D)`` in the query's dtype (transformers' layout after attention) and the mass
        ``(B, Hkv, L)`` fp32: softmax probabilities summed over the query heads of each KV group.
    """
    check_decode_inputs(query, exact_keys, exact_values, exact_pos, sketch, key_valid)
    b, hq, _, d = query.shape
    hkv, length = exact_keys.shape[1], key_valid.shape[1]
    group = hq // hkv
    wide = accumulation_dtype(query.dtype)
    q = query.reshape(b, hkv, group, d).to(wide)
    key_valid = key_valid.to(torch.bool)

    pos = exact_pos.long()
    filled = pos >= 0
    exact_ok = filled & key_valid.gather(1, pos.clamp(min=0).view(b, -1)).view(b, hkv, -1)
    exact_logits = torch.matmul(q, exact_keys.to(wide).transpose(-1, -2)) * scaling  # (B, Hkv, G, E)
    exact_logits = exact_logits.masked_fill(~exact_ok.unsqueeze(2), float("-inf"))

    vague = key_valid.unsqueeze(1) & ~exact_position_map(exact_pos, length)
    vague &= sketch.enabled.view(b, 1, 1) if sketch is not None else torch.zeros_like(vague)
    chunks = [(start, min(length, start + CHUNK_POSITIONS)) for start in range(0, length, CHUNK_POSITIONS)]
    vague_logits = []
    for start, stop in chunks:
        if sketch is None:
            vague_logits.append(exact_logits.new_full((b, hkv, group, stop - start), float("-inf")))
            continue
        keys, _ = sketch.query(_positions(b, hkv, start, stop, query.device))
        logits = torch.matmul(q, keys.to(wide).transpose(-1, -2)) * scaling  # (B, Hkv, G, c)
        vague_logits.append(logits.masked_fill(~vague[:, :, start:stop].unsqueeze(2), float("-inf")))

    probs = torch.softmax(torch.cat([exact_logits, *vague_logits], dim=-1), dim=-1).nan_to_num_(0.0)
    exact_probs, vague_probs = probs.split([exact_logits.shape[-1], length], dim=-1)

    out = torch.matmul(exact_probs, exact_values.to(wide))  # (B, Hkv, G, D)
    if sketch is not None:
        for start, stop in chunks:
            _, values = sketch.query(_positions(b, hkv, start, stop, query.device))
            out += torch.matmul(vague_probs[..., start:stop], values.to(wide))

    mass = exact_probs.new_zeros(b, hkv, length + 1)
    mass.scatter_add_(2, torch.where(filled, pos, length), exact_probs.sum(dim=2))
    mass = mass[:, :, :length] + vague_probs.sum(dim=2)
    return out.to(query.dtype).reshape(b, 1, hq, d), mass.float()


def _positions(batch: int, heads: int, start: int, stop: int, device) -> torch.Tensor:
    return torch.arange(start, stop, device=device).expand(batch, heads, stop - start)
