"""``full``: the uncompressed cache, on the same interface as the compressed ones (the reference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvreviver_core.budget import Budget
from kvreviver_core.kernels import triton_available
from kvreviver_core.methods.base import CompressedLayer, Method, register, tensor_bytes

STATIC_CHUNK = 256  # slots the static layout grows by


class FullLayer(CompressedLayer):
    """Keeps every token: ``keys``/``values`` are ``(batch, kv_heads, seq, head_dim)``.

    With ``static``, the decode steps write into buffers of fixed capacity (grown by ``STATIC_CHUNK`` slots) at a
    position the device keeps, and attention masks the slots past the length: transformers' StaticCache layout, whose
    steps a CUDA graph can replay (:mod:`kvreviver_core.graphs`).
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
        """The static decode step's attention. transformers builds its mask from host-side lengths, which a replayed
        graph would keep from its capture, so the slots past the device's length are masked here. All slots before
        the last ``STATIC_CHUNK`` are always filled (the buffers grow by that much when full): flash attention takes
        them without a mask, the masked tail goes through one Triton kernel on CUDA (:mod:`.static_tail`) or the plain
        math elsewhere, and the two merge by log-sum-exp."""
        if self._length is None or query.shape[2] != 1:
            return None
        prefix = self.keys.shape[-2] - STATIC_CHUNK
        head = None
        if prefix > 0:
            head = _attention_with_lse(query, self.keys[:, :, :prefix], self.values[:, :, :prefix], scaling)
        tail_keys, tail_values = self.keys[:, :, prefix:], self.values[:, :, prefix:]
        if query.is_cuda and triton_available():
            from kvreviver_core.kernels.static_tail import tail_attention

            return tail_attention(query, tail_keys, tail_values, prefix, self._length, scaling, head).transpose(1, 2)
        tail = torch.arange(prefix, self.keys.shape[-2], device=self.device) < self._length
        out, lse = _attention_with_lse(query, tail_keys, tail_values, scaling, tail)
        out = out.float()
        if head is not None:
            head_out, head_lse = head
            top = torch.maximum(lse, head_lse)
            weight, head_weight = torch.exp(lse - top), torch.exp(head_lse - top)
            out = (out * weight + head_out.float() * head_weight) / (weight + head_weight)
        return out.to(query.dtype).transpose(1, 2)

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


def _attention_with_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                        valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` ``(B, Hq, 1, D)`` over ``keys``/``values`` ``(B, Hkv, N, D)`` (``valid`` ``(N,)``:
    the slots to attend, default all): the output ``(B, Hq, 1, D)`` (the query's dtype from flash, else fp32) and
    its log-sum-exp ``(B, Hq, 1, 1)`` fp32. Flash attention on CUDA in 16-bit dtypes without a mask, the math
    otherwise."""
    group = query.shape[1] // keys.shape[1]
    if group > 1:
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    if valid is None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, keys, values, scale=scaling)[:2]
        return out, lse.unsqueeze(-1)
    logits = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scaling
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    return torch.matmul(logits.softmax(dim=-1), values.float()), logits.logsumexp(dim=-1, keepdim=True)


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
