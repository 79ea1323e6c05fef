"""``full``: the uncompressed cache, on the same interface as the compressed ones (the reference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvreviver_core.attention import _sdpa
from kvreviver_core.budget import Budget
from kvreviver_core.methods.base import CompressedLayer, Method, register, tensor_bytes

STATIC_CHUNK = 256  # slots the static layout grows by


class FullLayer(CompressedLayer):
    """Keeps every token: ``keys``/``values`` are ``(batch, kv_heads, seq, head_dim)``.

    With ``static``, the decode steps write into buffers of fixed capacity (grown by ``STATIC_CHUNK`` slots) at a
    position the device keeps, and attention masks the slots past the length: transformers' StaticCache layout, whose
    steps a CUDA graph can replay (:mod:`kvreviver_core.graphs`). Its attention reads the whole capacity.
    """

    def __init__(self, layer_idx: int, budget: Budget, static: bool = False) -> None:
        super().__init__(layer_idx, budget)
        self.static = static
        self._length: torch.Tensor | None = None  # (1,) on the device while the static decode runs

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        if self.static and t == 1 and self.offsets is not None:
            if self._length is None:
                if bool(self.offsets.any()):
                    raise ValueError("the static full cache takes unpadded sequences of one length")
                self._length = torch.full((1,), self.logical_len, dtype=torch.long, device=self.device)
            self._reserve(self.logical_len + 1)
            self._length.add_(1)
            index = self._length - 1
            self.keys.index_copy_(2, index, key_states)
            self.values.index_copy_(2, index, value_states)
            self.logical_len += 1
            return self.keys, self.values
        if self._length is not None:  # back to concatenation
            self.keys, self.values = self.keys[:, :, : self.logical_len], self.values[:, :, : self.logical_len]
            self._length = None
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.logical_len += t
        return self.keys, self.values

    def _reserve(self, length: int) -> None:
        if length > self.keys.shape[-2]:
            room = -(-length // STATIC_CHUNK) * STATIC_CHUNK - self.logical_len
            pad = torch.nn.functional.pad
            self.keys = pad(self.keys[:, :, : self.logical_len], (0, 0, 0, room))
            self.values = pad(self.values[:, :, : self.logical_len], (0, 0, 0, room))

    def fused_attention(self, query, key, value, mask, scaling) -> torch.Tensor | None:
        # transformers builds its mask from host-side lengths, which a replayed graph would keep from its capture;
        # the static decode masks the slots past the device's length instead (the sequences are unpadded).
        if self._length is None or query.shape[2] != 1:
            return None
        attend = (torch.arange(key.shape[2], device=self.device) < self._length).view(1, 1, 1, -1)
        return _sdpa(query, key, value, attend, scaling)

    def decode_graph_key(self) -> tuple | None:
        if self._length is None:
            return None
        self._reserve(self.logical_len + 1)
        return self.keys.shape[-2], self.keys.data_ptr(), self.values.data_ptr()

    def advance_replayed_step(self) -> None:
        self.logical_len += 1

    def memory_bytes(self) -> int:
        return tensor_bytes(self.keys, self.values)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keys, self.values = self.keys[indices], self.values[indices]


@register("full")
@dataclass
class FullMethod(Method):
    """No compression. The budget is ignored.

    Args:
        static: decode into fixed-capacity buffers that a CUDA graph can replay (see :class:`FullLayer`).
    """

    static: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.static, bool):
            raise ValueError(f"static must be true or false, got {self.static!r}")

    @classmethod
    def graph_options(cls) -> dict:
        return {"static": True}

    def make_layer(self, layer_idx: int, budget: Budget) -> CompressedLayer:
        return FullLayer(layer_idx, budget, static=self.static)
