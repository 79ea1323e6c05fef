"""Throughput and memory measurement: a background NVML sampler, synchronized timers, and the profile harness.

Peak device memory comes from a thread that reads a :data:`MemoryReader` every ``interval_s`` (NVML's "memory
used" of the device, by default every 10 ms). It sees what the process really holds on the card (CUDA context,
weights, the caching allocator's reserved blocks), which ``torch.cuda.max_memory_allocated`` does not; both are
reported side by side. The reader is a plain callable, so tests can drive the sampler with a fake source.

A model spread over several GPUs (``device_map``) is read on every GPU that holds part of it: the sampler keeps
each GPU's own peak, and the reported peak is their sum (what the run needs provisioned, GPU by GPU).

One measured run (:func:`measure_run`) is a manual prefill + decode loop through the real model forward and a
method's cache: one prefill of ``batch x context`` synthetic token ids, then a fixed number of greedy decode steps.
The first decode steps are a warm-up and are not timed. Running out of device memory is a result:
:func:`guarded` turns it into an ``oom`` row after releasing what the run held.
"""

from __future__ import annotations

import gc
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence, Union

import torch

from kvreviver_core.cache import CompressedCache, make_cache
from kvreviver_core.generation import cache_kwargs, greedy_next
from kvreviver_core.graphs import GraphedDecode
from kvreviver_core.methods import METHODS
from kvreviver_core.specs import method_spec

MemoryReader = Callable[[], Union[int, Sequence[int]]]
"""Returns the device memory in use now, in bytes: one number, or one per device (a model on several GPUs)."""
Devices = Union[torch.device, Sequence[torch.device]]


class NvmlUnavailable(RuntimeError):
    """NVML cannot be read here (no NVIDIA driver, no nvidia-ml-py, or a CPU device)."""


def as_devices(devices: Devices) -> list[torch.device]:
    return [devices] if isinstance(devices, torch.device) else list(devices)


def model_devices(model: torch.nn.Module) -> list[torch.device]:
    """The devices holding ``model``'s weights, in the order of its parameters (several with a device map)."""
    found: dict[torch.device, None] = {}
    for param in model.parameters():
        found.setdefault(param.device)
    return list(found)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where token ids go: the input embedding's device (the first layer's GPU under a device map)."""
    return model.get_input_embeddings().weight.device


def nvml_reader(devices: Devices) -> MemoryReader:
    """NVML's "memory used" of the card behind each of ``devices``, one handle per card, read as a list in the
    order given (CUDA_VISIBLE_DEVICES taken into account)."""
    devices = as_devices(devices)
    not_gpu = sorted({d.type for d in devices if d.type != "cuda"})
    if not devices or not_gpu:
        raise NvmlUnavailable(f"NVML reads NVIDIA GPUs only, not {', '.join(not_gpu) or 'no device'}")
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError, or NVMLError when there is no driver
        raise NvmlUnavailable(f"NVML is unavailable: {exc}") from None
    handles = []
    for device in devices:
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            # torch's own mapping from its device index to NVML's (it honours CUDA_VISIBLE_DEVICES).
            index = torch.cuda._get_nvml_device_index(index)
        except (AttributeError, RuntimeError):
            pass
        handles.append(pynvml.nvmlDeviceGetHandleByIndex(index))
    return lambda: [int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) for handle in handles]


@dataclass
class PeakSampler:
    """Reads ``read()`` on a background thread every ``interval_s`` and keeps the peak of each device.

    ``start()`` takes one reading at once (the baseline); ``stop()`` takes a last one, joins the thread and returns
    the peak, so even a region shorter than the interval is covered at both ends. An exception raised by the reader
    stops the sampling and is raised again by ``stop()``. With several devices, ``peak_bytes`` and
    ``baseline_bytes`` are the sums over the devices of each one's own peak and baseline.
    """

    read: MemoryReader
    interval_s: float = 0.01
    baseline_per_device: tuple[int, ...] = field(default=(), init=False)
    peak_per_device: tuple[int, ...] = field(default=(), init=False)
    samples: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not (self.interval_s > 0):
            raise ValueError(f"sampling interval must be > 0 seconds, got {self.interval_s}")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def baseline_bytes(self) -> int:
        return sum(self.baseline_per_device)

    @property
    def peak_bytes(self) -> int:
        return sum(self.peak_per_device)

    def _reading(self) -> tuple[int, ...]:
        value = self.read()
        return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)

    def _take(self) -> None:
        reading = self._reading()
        if len(reading) != len(self.peak_per_device):
            raise ValueError(f"the memory reader gave {len(reading)} devices, {len(self.peak_per_device)} before")
        self.samples += 1
        self.peak_per_device = tuple(map(max, self.peak_per_device, reading))

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self._take()
        except BaseException as exc:  # surfaced by stop(); a dead sampler must not look like a low peak
            self._error = exc

    def start(self) -> "PeakSampler":
        if self._thread is not None:
            raise RuntimeError("PeakSampler.start() called twice")
        self.baseline_per_device = self.peak_per_device = self._reading()
        self.samples = 1
        self._thread = threading.Thread(target=self._loop, name="kvreviver-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        if self._thread is None:
            raise RuntimeError("PeakSampler.stop() called before start()")
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        self._take()
        return self.peak_bytes

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "PeakSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.running:
            self.stop()


def synchronize(devices: Devices) -> None:
    for device in as_devices(devices):
        if device.type == "cuda":
            torch.cuda.synchronize(device)


class Timer:
    """Wall-clock seconds of a block, with the devices synchronized on entry and exit (GPU work is asynchronous)."""

    def __init__(self, device: Devices) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def release_memory(devices: Devices) -> None:
    """Give freed blocks back to the driver so that NVML's reading reflects what the next run holds."""
    gc.collect()
    gpus = [d for d in as_devices(devices) if d.type == "cuda"]
    if gpus:
        torch.cuda.empty_cache()  # every device's cached blocks
    for device in gpus:
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class RunSpec:
    """What one measured run does. ``decode_warmup`` first decode steps are run but not timed."""

    method: str  # a method spec, ``name[:key=value...]`` (kvreviver_core.specs)
    budget: float
    context: int
    new_tokens: int
    decode_warmup: int = 4
    seed: int = 0
    sample_interval_s: float = 0.01
    cuda_graphs: bool = False  # decode through kvreviver_core.graphs, with the method's graph_options

    def __post_init__(self) -> None:
        if not (0 < self.budget <= 1):
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.context < 1:
            raise ValueError(f"context must be >= 1 token, got {self.context}")
        if self.new_tokens < 1:
            raise ValueError(f"new tokens must be >= 1, got {self.new_tokens}")
        if self.decode_warmup < 0:
            raise ValueError(f"decode warm-up steps must be >= 0, got {self.decode_warmup}")

    @property
    def timed_steps(self) -> int:
        return self.new_tokens - min(self.decode_warmup, self.new_tokens - 1)


@dataclass
class ProfileRow:
    """One method at one batch size. Byte counts are None where they cannot be measured (e.g. NVML on a CPU).

    Memory figures are sums over the GPUs that hold the model; the ``*_per_device_bytes`` lists give each GPU's
    own figure, in the order of :func:`model_devices`.
    """

    method: str
    batch: int
    status: str  # "ok" or "oom"
    prefill_s: float | None = None
    decode_s: float | None = None
    decode_steps_timed: int | None = None
    decode_tokens_per_s: float | None = None
    decode_graph_replays: int | None = None  # decode steps (warm-up included) replayed from a CUDA graph
    kv_bytes: int | None = None
    kv_full_bytes: int | None = None
    nvml_baseline_bytes: int | None = None
    nvml_peak_bytes: int | None = None
    torch_max_allocated_bytes: int | None = None
    nvml_baseline_per_device_bytes: list[int] | None = None
    nvml_peak_per_device_bytes: list[int] | None = None
    torch_max_allocated_per_device_bytes: list[int] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


def synthetic_ids(vocab_size: int, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    """``(batch, length)`` random token ids, avoiding the first few (pad/bos/eos) ids."""
    generator = torch.Generator().manual_seed(seed)
    low = min(3, vocab_size - 1)
    return torch.randint(low, vocab_size, (batch, length), generator=generator).to(device)


def profiled_cache(method: str, budget: float, model: torch.nn.Module, cuda_graphs: bool) -> CompressedCache:
    """The cache of a method spec for a profiled run; with ``cuda_graphs``, under the method's graph options (the
    spec's own options win)."""
    name, options = method_spec(method)
    if cuda_graphs:
        options = {**METHODS[name].graph_options(), **options}
    return make_cache(name, budget, model=model, **options)


@torch.no_grad()
def measure_run(model: torch.nn.Module, spec: RunSpec, batch: int, memory: MemoryReader | None = None) -> ProfileRow:
    """Prefill ``batch`` sequences of ``spec.context`` tokens, then decode ``spec.new_tokens`` greedy steps.

    Prefill time covers one forward pass over ``(batch, context)`` ids, cache compression included. Decode
    tokens/s counts every sequence: ``batch x timed steps / decode seconds``. KV bytes are read from the cache at
    the end (``cache.memory_bytes()``). With a ``memory`` reader, a :class:`PeakSampler` runs over the whole run.
    """
    devices, device = model_devices(model), input_device(model)
    release_memory(devices)
    ids = synthetic_ids(model.config.vocab_size, batch, spec.context, spec.seed, device)
    sampler = PeakSampler(memory, spec.sample_interval_s) if memory is not None else None
    with sampler if sampler is not None else nullcontext():
        cache = profiled_cache(spec.method, spec.budget, model, spec.cuda_graphs)
        forward = cache_kwargs(model, cache)
        with Timer(devices) as prefill:
            logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **forward).logits
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        graphed = GraphedDecode(model, cache, forward) if spec.cuda_graphs else None
        step = graphed.step if graphed is not None else lambda t: greedy_next(model, t, forward)
        warmup = spec.new_tokens - spec.timed_steps
        for _ in range(warmup):
            token = step(token)
        with Timer(devices) as decode:
            for _ in range(spec.timed_steps):
                token = step(token)
        kv_bytes, kv_full = cache.memory_bytes(), cache.full_bytes()
    row = ProfileRow(
        spec.method, batch, "ok", prefill_s=prefill.seconds, decode_s=decode.seconds,
        decode_steps_timed=spec.timed_steps, decode_tokens_per_s=batch * spec.timed_steps / decode.seconds,
        kv_bytes=kv_bytes, kv_full_bytes=kv_full,
        decode_graph_replays=graphed.steps["replayed"] if graphed is not None else None,
    )
    if sampler is not None:
        row.nvml_baseline_bytes, row.nvml_peak_bytes = sampler.baseline_bytes, sampler.peak_bytes
        row.nvml_baseline_per_device_bytes = list(sampler.baseline_per_device)
        row.nvml_peak_per_device_bytes = list(sampler.peak_per_device)
    gpus = [d for d in devices if d.type == "cuda"]
    if gpus:
        row.torch_max_allocated_per_device_bytes = [torch.cuda.max_memory_allocated(d) for d in gpus]
        row.torch_max_allocated_bytes = sum(row.torch_max_allocated_per_device_bytes)
    return row


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OOM error, or the allocation failures that cuBLAS/cuDNN report as plain RuntimeErrors."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


def guarded(step: Callable[[int], ProfileRow], method: str, batch: int, device: Devices) -> ProfileRow:
    """Run ``step(batch)``; out of memory gives an ``oom`` row, after the failed run's memory is released."""
    try:
        return step(batch)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
    # Outside the except block the traceback (and the tensors its frames hold) is gone, so it can be freed.
    release_memory(device)
    return ProfileRow(method, batch, "oom")


def find_max_batch(fits: Callable[[int], bool], start: int = 1, limit: int = 1024) -> int:
    """Largest batch in ``[1, limit]`` for which ``fits`` holds: doubling from ``start``, then bisecting.

    ``start`` is a batch already known to fit (or 1, which is tried). Returns 0 when batch 1 does not fit.
    Assumes that a batch that does not fit is never followed by a larger one that does.
    """
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    if start == 1 and not fits(1):
        return 0
    good, bad = start, None
    while bad is None and good < limit:
        trial = min(2 * good, limit)
        if fits(trial):
            good = trial
        else:
            bad = trial
    if bad is None:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good
