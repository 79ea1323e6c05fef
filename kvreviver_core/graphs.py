"""Greedy decode steps replayed from CUDA graphs, where the cache allows it.

A decode step of a HF model in eager mode launches every kernel from Python: ~50 a layer for the model itself,
more for a cache that works per step. At batch 1 the GPU then idles between launches, and the host's time is the
step's time (BENCHMARKS.md, issue 7). A CUDA graph records one step's launches once and replays them with one call.

A replay reruns the recorded kernels on the same addresses with the same arguments, so a step can be captured only
when every tensor it touches stays where it is and every number that changes from step to step is read on the
device. Here the position ids come from a device counter that the step itself advances, and each cache layer says
whether its next step qualifies (``decode_graph_key()``: None when it does not, else what a capture depends on,
such as its buffers' addresses) and does the host's part of a replayed step (``advance_replayed_step()``: its
lengths). :class:`~kvreviver_core.methods.reviver.ReviverLayer` qualifies on its in-place step, and
:class:`~kvreviver_core.methods.full.FullLayer` with ``static=True``.

A key seen for the first time runs eagerly (Triton compiles its variants outside any capture); the second step with
that key is captured, and the steps after it replay the capture. A new key (a buffer grew) drops the old graph.

The capture runs on a stream of higher priority than the default, and torch instantiates graphs with their kernels'
captured priorities. So what a cache launches on its own side stream (KVReviver's scores and Algorithm 3,
:mod:`kvreviver_core.kernels.side_stream`, created at the default priority) gives way to the model's kernels when
both wait for free multiprocessors: the output projection after the attention need not wait for 1024 score
programs to leave.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch

from kvreviver_core.generation import greedy_next

CAPTURE_PRIORITY = -1  # the captured kernels' stream priority (lower is higher; the default stream's is 0)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    token_in: torch.Tensor  # (B, 1) the step's input token, copied in before each replay
    token_out: torch.Tensor  # (B, 1) its greedy next token, written by the replay


class GraphedDecode:
    """Run greedy decode steps ``step(token) -> next token`` through CUDA graphs where the cache allows it.

    Args:
        model: the HF causal LM, on one CUDA device.
        cache: the prefilled cache (a :class:`~kvreviver_core.cache.CompressedCache`); it must not be stepped
            outside this object afterwards.
        forward: the keyword arguments that pass the cache to the model (:func:`~kvreviver_core.generation.cache_kwargs`).

    The sequences are taken to be unpadded and of one length (as ``profile``'s synthetic prompts are): every
    sequence's next position is the cache's length.
    """

    def __init__(self, model: torch.nn.Module, cache, forward: dict) -> None:
        if next(model.parameters()).device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model, self.cache, self.forward = model, cache, forward
        self.position: torch.Tensor | None = None  # (B, 1) next position, advanced by each step on the device
        self._captured: _Captured | None = None
        self._seen: Hashable | None = None
        self.steps = {"eager": 0, "captured": 0, "replayed": 0}
        self._capture_stream = torch.cuda.Stream(next(model.parameters()).device, priority=CAPTURE_PRIORITY)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One greedy decode step from ``token`` ``(B, 1)``: the next token ``(B, 1)``."""
        if self.position is None:
            self.position = torch.full_like(token, self.cache.get_seq_length(), dtype=torch.long)
        key = self.cache.decode_graph_key()
        if key is None or key != self._seen:
            self._seen, self._captured = key, None  # a new key: the old capture's buffers are gone
            self.steps["eager"] += 1
            return self._forward(token)
        captured = self._captured
        if captured is None:
            captured = self._captured = self._capture(token)  # the capture ran the step's host part
            self.steps["captured"] += 1
        else:
            self.cache.advance_replayed_step()
            captured.token_in.copy_(token)
            self.steps["replayed"] += 1
        captured.graph.replay()
        return captured.token_out.clone()

    def _forward(self, token: torch.Tensor) -> torch.Tensor:
        positions = self.position
        out = greedy_next(self.model, token, self.forward, position_ids=positions)
        positions.add_(1)
        return out

    def _capture(self, token: torch.Tensor) -> _Captured:
        token_in = token.clone()
        graph = torch.cuda.CUDAGraph()
        # A pool of its own: the previous capture's went with it.
        with torch.cuda.graph(graph, stream=self._capture_stream):
            token_out = self._forward(token_in)
        return _Captured(graph, token_in, token_out)

