"""torch.compile for the per-token work outside attention: the model's RMSNorms and MLPs.

At batch 1 a decode token of a 7B model is mostly small kernels. An eager HF RMSNorm is about seven of them (the
fp32 cast, square, mean, rsqrt, two products, the cast back) on a hidden state of a few KB, and a gated MLP runs
its activation and product apart from its matrix products. Replayed from a CUDA graph each still costs its launch
gap. Compiled, a norm is one kernel and the MLP's element-wise part one more (Inductor keeps cuBLAS for the
matrix products). What a cache does is left alone, so the full cache and a compressed one lose the same
overhead, and a decode benchmark then compares their attention rather than the model's launch count.

The modules are compiled in place (``nn.Module.compile``), by class name, so every decoder layer of one class
shares one compiled graph. Shapes go dynamic after their first change (Inductor's default), so prefill and
decode, and every batch size, share it as well. The first calls compile; :class:`~kvreviver_core.graphs.GraphedDecode`
runs a key's first step eagerly, so no compilation happens inside a capture.
"""

from __future__ import annotations

import torch

COMPILED_SUFFIXES = ("RMSNorm", "MLP")  # LlamaRMSNorm, Qwen2MLP, ...


def compile_token_blocks(model: torch.nn.Module, backend: str = "inductor") -> list[str]:
    """Compile, in place, every submodule of ``model`` whose class name ends with one of ``COMPILED_SUFFIXES``.

    Returns the compiled modules' names (e.g. ``model.layers.0.mlp``); raises ``ValueError`` when none matches,
    since a benchmark that asked for compiled blocks must not silently run without them.
    """
    names = [name for name, module in model.named_modules() if type(module).__name__.endswith(COMPILED_SUFFIXES)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no module whose class name ends with "
                         f"{' or '.join(COMPILED_SUFFIXES)}: nothing to compile")
    # One graph serves every layer, but each new (shape, dtype) of a norm and of an MLP is a recompile of it.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for name in names:
        model.get_submodule(name).compile(backend=backend)
    return names
