"""``full``: the uncompressed cache, on the same interface as the compressed ones (the reference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvreviver_core.budget import Budget
from kvreviver_core.methods.base import CompressedLayer, Method, register, tensor_bytes


class FullLayer(CompressedLayer):
    """Keeps every token: ``keys``/``values`` are ``(batch, kv_heads, seq, head_dim)``."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.logical_len += key_states.shape[-2]
        return self.keys, self.values

    def memory_bytes(self) -> int:
        return tensor_bytes(self.keys, self.values)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keys, self.values = self.keys[indices], self.values[indices]


@register("full")
@dataclass
class FullMethod(Method):
    """No compression. The budget is ignored."""

    def make_layer(self, layer_idx: int, budget: Budget) -> CompressedLayer:
        return FullLayer(layer_idx, budget)
