"""torch.compile for the per-token work outside attention: the model's decoder layers, final norm included.

At batch 1 a decode token of a 7B model is mostly small kernels. An eager HF RMSNorm is about seven of them (the
fp32 cast, square, mean, rsqrt, two products, the cast back), the rotary embedding ten a layer (a product, a
negation, a concatenation, a product and a sum, for the queries and for the keys), and a gated MLP runs its
activation and product apart from its matrix products. Replayed from a CUDA graph each still costs its launch
gap. Compiled, the residual add and the norm after it are one kernel, the rotary embedding one more, and the MLP's
element-wise part one (Inductor keeps cuBLAS for the matrix products). What a cache does is left alone: the
cache's ``update`` and the attention function are ``torch.compiler.disable``d (:mod:`kvreviver_core.cache`,
:mod:`kvreviver_core.attention`), so a compiled layer breaks its graph there and runs them eagerly. The full cache
and a compressed one then lose the same overhead, and a decode benchmark compares their attention rather than the
model's launch count.

The modules are compiled in place (``nn.Module.compile``), by class name, the outermost match only (a decoder
layer's own norms go into its graph). Every decoder layer of one class shares one compiled graph: the layer index
that each passes to the cache is not specialised on (``allow_unspec_int_on_nn_module``), so 32 layers are not 32
recompiles. Shapes go dynamic after their first change (Inductor's default), so prefill and decode, and every batch
size, share it as well. The first calls compile; :class:`~kvreviver_core.graphs.GraphedDecode` runs a key's first
step eagerly, so no compilation happens inside a capture.
"""

from __future__ import annotations

import torch

COMPILED_SUFFIXES = ("DecoderLayer", "RMSNorm", "MLP")  # LlamaDecoderLayer, Qwen2RMSNorm, ...


def compile_token_blocks(model: torch.nn.Module, backend: str = "inductor") -> list[str]:
    """Compile, in place, every submodule of ``model`` whose class name ends with one of ``COMPILED_SUFFIXES`` and
    that no such module holds.

    Returns the compiled modules' names (e.g. ``model.layers.0``, ``model.norm``); raises ``ValueError`` when none
    matches, since a benchmark that asked for compiled blocks must not silently run without them.
    """
    names = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in names)
        if type(module).__name__.endswith(COMPILED_SUFFIXES) and not inside:
            names.append(name)
    if not names:
        raise ValueError(f"{type(model).__name__} has no module whose class name ends with "
                         f"{' or '.join(COMPILED_SUFFIXES)}: nothing to compile")
    # One graph serves every layer, but each new (shape, dtype) of a block, and each graph break, is a recompile.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    for name in names:
        model.get_submodule(name).compile(backend=backend)
    return names
