"""One side CUDA stream per device, for work that the rest of a decode step does not wait for.

KVReviver's Algorithm 3 (the in-place step's ``_compress``: folds and swap-backs) changes only the layer's own
store, and nothing reads that store again before the layer's next step. At batch 1 it is one program per KV head,
a chain of dependent reads that leaves most of the GPU idle for 10-20 us a layer. Launched on the side stream, it
runs beside the layer's output projection and MLP and the next layer's projections instead of before them, and so
does the update of the cumulative scores that it reads (the model's output does not wait on the scores). Within
the attention itself, under the linear combine, the exact splits run there beside the Vague chain, and the combine
joins them (:mod:`.reviver_decode`).

The protocol: :func:`launch_beside` forks from the current stream (the work sees everything launched before it)
and marks the device pending; :func:`join` makes the current stream wait for the side stream's work so far. Whoever
reads or changes a store that had work launched beside must join first: :class:`~kvreviver_core.cache.CompressedCache`
joins before every layer's update, and a layer launches beside only when another layer of the same device follows
it in the step, so a step ends joined (as a CUDA graph capture must). The side stream is serial: one join covers
all the work launched beside so far. Tensors that the work reads and nobody else holds (a step's scratch) are
kept with it until the join: the current stream's allocator could hand their memory out again before the side
stream is done.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class _SideStream:
    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.forked = torch.cuda.Event()
        self.done = torch.cuda.Event()
        self.pending = False
        self.kept: list[torch.Tensor] = []


_SIDE: dict[torch.device, _SideStream] = {}


def _device(device: torch.device) -> torch.device:
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def launch_beside(device: torch.device, launch: Callable[[], None], keep: Sequence[torch.Tensor] = ()) -> None:
    """Run ``launch`` (kernel launches) on ``device``'s side stream, after the work already on the current stream
    (in line off CUDA: a CPU has no streams), holding the tensors ``keep`` it reads until the next :func:`join`."""
    if device.type != "cuda":
        launch()
        return
    device = _device(device)
    side = _SIDE.get(device)
    if side is None:
        side = _SIDE[device] = _SideStream(device)
    side.forked.record(torch.cuda.current_stream(device))
    side.stream.wait_event(side.forked)
    with torch.cuda.stream(side.stream):
        launch()
    side.done.record(side.stream)
    side.pending = True
    side.kept.extend(keep)


def join(device: torch.device) -> None:
    """Make ``device``'s current stream wait for the work launched beside so far (nothing to do when none is)."""
    if device.type != "cuda":
        return
    side = _SIDE.get(_device(device))
    if side is not None and side.pending:
        torch.cuda.current_stream(side.stream.device).wait_event(side.done)
        side.pending = False
        side.kept.clear()  # freed after the wait: what the current stream allocates next runs after the side's reads
