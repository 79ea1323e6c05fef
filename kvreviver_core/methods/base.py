"""What every compression method shares: the layer protocol, the method registry, and logical/physical lengths.

A method is a typed dataclass (its options, checked in ``__post_init__``) registered under a name. It builds one
:class:`CompressedLayer` per model layer. A layer stores keys and values as ``(batch, kv_heads, seq, head_dim)``
and talks to the attention function (:mod:`kvreviver_core.attention`) through four hooks:

* :meth:`CompressedLayer.slot_mask`: which stored slots may be attended (empty or dropped slots are False);
* :meth:`CompressedLayer.score_queries`: whether, and over how many of the newest queries, it wants scores;
* :meth:`CompressedLayer.observe`: receives those scores after attention; compression happens here;
* :meth:`CompressedLayer.fused_attention`: a layer may compute attention itself (e.g. a decode kernel).

Lengths: ``get_seq_length`` is the *logical* length (all tokens seen, which RoPE positions follow), and
``get_mask_sizes`` reports the *physical* length (slots held) with the offset between the two, so masks match the
tensors returned by ``update``. Batches are left-padded; a sequence's pads are the slots its prompt's last token
cannot attend at prefill, and every method keeps per-sequence offsets from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from transformers.cache_utils import CacheLayerMixin

from kvreviver_core.budget import Budget

METHODS: dict[str, type["Method"]] = {}


def register(name: str) -> Callable[[type["Method"]], type["Method"]]:
    def wrap(cls: type["Method"]) -> type["Method"]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def list_methods() -> list[str]:
    return sorted(METHODS)


@dataclass
class Method:
    """Base of a method's options. Subclasses are dataclasses registered with :func:`register`."""

    name: ClassVar[str] = ""
    # The Budget fields (of budget.TUNABLE_FIELDS) the method's layers read; an option naming any other is refused,
    # since it would change nothing.
    budget_fields: ClassVar[tuple[str, ...]] = ()

    def prepare(self, model: torch.nn.Module | None) -> None:
        """Arrange anything the method needs on the model (weights, calibration). Default: nothing."""

    def make_layer(self, layer_idx: int, budget: Budget) -> "CompressedLayer":
        raise NotImplementedError

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def split_options(cls, options: dict) -> tuple[dict, dict]:
        """``options`` as (Budget fields, the method's own options); ValueError naming any option the method
        does not take."""
        allowed = [*cls.option_names(), *cls.budget_fields]
        unknown = set(options) - set(allowed)
        if unknown:
            raise ValueError(f"method {cls.name!r} has no option {', '.join(sorted(unknown))}; its options: "
                             f"{', '.join(allowed) or 'none'}")
        budget = {k: v for k, v in options.items() if k in cls.budget_fields}
        return budget, {k: v for k, v in options.items() if k not in budget}

    @classmethod
    def graph_options(cls) -> dict:
        """The options under which the method's decode steps can replay a CUDA graph (:mod:`kvreviver_core.graphs`)
        where they do not by default."""
        return {}


class CompressedLayer(CacheLayerMixin):
    """Base layer: logical length, per-sequence padding offsets, and the attention hooks (no compression)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, budget: Budget) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.budget = budget
        self.logical_len = 0
        self.offsets: torch.Tensor | None = None  # (B,) left-padding per sequence, set at the first observe
        # Set by the cache before each update: whether another layer of the same device runs after this one in the
        # step, so that this layer may leave work on the device's side stream (kernels/side_stream.py).
        self.followed_on_device = False
        self.prompt_lengths: torch.Tensor | None = None  # (B,) non-padding prompt tokens

    # -- transformers' CacheLayerMixin ---------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.batch, self.heads, _, self.head_dim = key_states.shape
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.logical_len

    def get_max_length(self) -> int:
        return -1

    def physical_length(self) -> int:
        """Slots that ``update`` returns before the new tokens (equals the logical length unless tokens are dropped)."""
        return self.logical_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        physical = self.physical_length()
        return physical + query_length, self.logical_len - physical

    def reset(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be reset; build a new cache with make_cache")

    # -- hooks used by the attention function ---------------------------------------------------------------------
    def slot_mask(self) -> torch.Tensor | None:
        """``(B, physical_len)`` bool of attendable stored slots, or None when all are (padding aside)."""
        return None

    def score_queries(self, query_length: int) -> int | None:
        """0: no scores needed; None: sum over all queries; w: over the last w queries."""
        return 0

    def fused_attention(self, query, key, value, mask, scaling) -> torch.Tensor | None:
        return None

    # -- CUDA graphs (kvreviver_core/graphs.py) --------------------------------------------------------------------
    def decode_graph_key(self) -> tuple | None:
        """None when this layer's next decode step cannot be captured in a CUDA graph (a step that changes shapes or
        reads the device from the host), else what a capture depends on (its buffers' addresses)."""
        return None

    def advance_replayed_step(self) -> None:
        """The host's part of a decode step that a graph replays (only called after a key that is not None)."""
        raise NotImplementedError(f"{type(self).__name__} has no capturable decode step")

    def observe(self, scores: torch.Tensor | None, key_valid: torch.Tensor) -> None:
        """After attention: ``scores`` ``(B, Hkv, N)`` fp32 or None, ``key_valid`` ``(B, N)`` bool."""
        if self.offsets is None:
            self._record_padding(key_valid)

    def _record_padding(self, key_valid: torch.Tensor) -> None:
        # Left padding: the pads are the leading columns the last prompt token cannot see.
        lengths = key_valid.sum(dim=-1).to(torch.long)
        self.prompt_lengths = lengths
        self.offsets = key_valid.shape[-1] - lengths

    # -- accounting ------------------------------------------------------------------------------------------------
    def token_bytes(self) -> int:
        """Bytes of one token's key and value over this layer's KV heads."""
        return 2 * self.heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def memory_bytes(self) -> int:
        raise NotImplementedError

    def full_bytes(self) -> int:
        """Bytes the uncompressed cache would hold now for this layer (padding excluded)."""
        if not self.is_initialized or self.prompt_lengths is None:
            return 0
        return int((self.logical_len - self.offsets).sum()) * self.token_bytes()


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
