"""transformers glue: the Cache that holds one compressed layer per model layer, and ``make_cache``."""

from __future__ import annotations

from typing import Callable

import torch
from transformers.cache_utils import Cache

from kvreviver_core import attention
from kvreviver_core.budget import Budget
from kvreviver_core.kernels import side_stream
from kvreviver_core.methods import METHODS, CompressedLayer, list_methods


class CompressedCache(Cache):
    """A transformers ``Cache`` whose layers are built by a method; pass it as ``past_key_values=``."""

    def __init__(self, method_name: str, budget: Budget, layer_factory: Callable[[int], CompressedLayer]) -> None:
        super().__init__(layers=[])
        self.method_name = method_name
        self.budget = budget
        self._layer_factory = layer_factory

    # A compiled decoder layer (kvreviver_core.compiled) runs this eagerly: it is host bookkeeping and Triton
    # launches, and tracing it would guard on (and recompile for) every length.
    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(self._layer_factory(len(self.layers)))
        layer = self.layers[layer_idx]
        # Work a layer left beside (the previous one's Algorithm 3) finishes before any other layer's step starts,
        # so that at most one runs and a step ends with none.
        side_stream.join(key_states.device)
        following = self.layers[layer_idx + 1] if layer_idx + 1 < len(self.layers) else None
        layer.followed_on_device = getattr(following, "device", None) == key_states.device
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        attention.announce_layer(layer_idx, layer)
        return keys, values

    def decode_graph_key(self) -> tuple | None:
        """Whether the next decode step can replay a CUDA graph (:mod:`kvreviver_core.graphs`): None when some layer's
        cannot, else what a captured step depends on."""
        keys = tuple(layer.decode_graph_key() for layer in self.layers)
        return keys if keys and all(key is not None for key in keys) else None

    def advance_replayed_step(self) -> None:
        """The host's part of a decode step that a graph replays."""
        for layer in self.layers:
            layer.advance_replayed_step()

    def memory_bytes(self) -> int:
        """Bytes held by the cache now: exact parts, sketches and metadata of every layer."""
        return sum(layer.memory_bytes() for layer in self.layers)

    def full_bytes(self) -> int:
        """Bytes the uncompressed cache would hold for the same tokens (padding excluded)."""
        return sum(layer.full_bytes() for layer in self.layers)

    def __repr__(self) -> str:
        return f"CompressedCache({self.method_name}, budget={self.budget.describe()}, layers={len(self.layers)})"


def make_cache(method: str, budget: Budget | float | int = 1.0, model: torch.nn.Module | None = None, **options) -> CompressedCache:
    """Build the cache of ``method`` at ``budget``; given ``model``, also route its attention through ours.

    Args:
        method: a name from :func:`list_methods`.
        budget: a :class:`Budget`, a fraction of the full cache's memory in (0, 1], or a token count (int > 1).
        model: the HF model the cache will be used with (required): its attention is routed through
            :func:`kvreviver_core.attention.kvreviver_attention`, which is plain SDPA for any other cache.
        options: the method's own options (see its dataclass), plus the Budget fields it reads (its
            ``budget_fields``: KVReviver's split, sketch_rows, replace_rate, recent_slack).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(list_methods())}")
    spec_cls = METHODS[method]
    budget_options, options = spec_cls.split_options(options)
    budget = Budget.coerce(budget, **budget_options)
    if model is None:
        raise ValueError("make_cache needs model= : the cache routes the model's attention through its scoring hook")
    spec = spec_cls(**options)
    attention.use_on(model)
    spec.prepare(model)
    return CompressedCache(method, budget, lambda idx: spec.make_layer(idx, budget))
