"""Decode kernels: KVReviver's fused revive+attention (Triton) and its pure-torch reference. The scoring methods'
prefill attention on Triton is :mod:`.scored_prefill` (picked by :func:`kvreviver_core.attention.scored_backend`).

:func:`decode_backend` picks what a layer runs for a decode step from its ``fused`` option:

* ``"auto"`` (default): the Triton kernel on CUDA when Triton is installed and the inputs are supported, else the
  layer's unfused path (revive, then exact attention);
* ``True``: the kernel on CUDA, the reference anywhere else;
* ``"reference"``: the pure-torch reference on any device (to check the kernel against it);
* ``False``: always the unfused path.

A decode step that runs the Triton kernel runs in place (:func:`inplace_kernels`, :mod:`.inplace_step`): the new token
is written into the fixed-capacity store and Algorithm 3 runs on the device; every other step uses the layer's torch
code.

Both backends take ``(query, exact_keys, exact_values, exact_pos, sketch, key_valid, scaling)`` and return
``(output (B, 1, Hq, D), mass (B, Hkv, L) fp32)``.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable

import torch

from kvreviver_core.kernels.reference import reviver_decode_reference
from kvreviver_core.sketch import VagueSketch

FUSED_CHOICES: tuple[object, ...] = ("auto", True, False, "reference")
DecodeFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def check_fused_option(fused: object) -> None:
    if not any(fused is choice or (isinstance(fused, str) and fused == choice) for choice in FUSED_CHOICES):
        raise ValueError(f"fused must be one of True, False, 'auto', 'reference'; got {fused!r}")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None  # looked up once: decode asks at every layer and step


def decode_backend(fused: object, query: torch.Tensor, sketch: VagueSketch | None) -> DecodeFn | None:
    """The decode attention to run for ``query`` under option ``fused``; None means the unfused path."""
    if fused is False:
        return None
    if fused == "reference":
        return reviver_decode_reference
    if query.device.type == "cuda" and triton_available():
        from kvreviver_core.kernels.reviver_decode import kernel_unsupported, reviver_decode_triton

        if kernel_unsupported(query, sketch) is None:
            return reviver_decode_triton
    return reviver_decode_reference if fused is True else None


def inplace_kernels(decode: DecodeFn | None):
    """The in-place step's module (:mod:`.inplace_step`) when the step's decode runs the Triton kernel, else None:
    the layer's torch code. Imported on demand: it needs Triton."""
    if decode is None or decode is reviver_decode_reference:
        return None
    from kvreviver_core.kernels import inplace_step

    return inplace_step


__all__ = ["FUSED_CHOICES", "check_fused_option", "decode_backend", "inplace_kernels",
           "reviver_decode_reference", "triton_available"]
