"""Benchmark 1 of issue 7: one decode step of attention over a KVReviver layer, against SDPA over the full cache.

Llama-2-7B shapes by default (32 heads, head_dim 128, bf16), budget 10%, contexts 8k/32k/128k. One real
``ReviverLayer`` per context: a prefill of random keys and values with random cumulative scores goes through its
compress step (Algorithm 3), then one decode token is appended. Then, on the same GPU and in the same run:

* ``kernel``: the fused Triton decode attention over the compressed store (exact slots + sketch), over the part
  map and bucket codes that the in-place decode step keeps (every launch of the attention included: under the
  linear combine the bucket logits, split-K pass, bucket weights and combine; else split-K pass and combine); a few
  block/warp configurations are swept. ``kernel_with_maps_us`` also builds the maps, as a step off the in-place
  path does;
* ``exact only``: the same kernel without the sketch, i.e. what the Vague reconstruction costs on top;
* ``sdpa full``: ``F.scaled_dot_product_attention`` over the full cache (what the full cache pays per layer);
* ``revive+sdpa``: the unfused path's attention, ``revive()`` (Algorithm 4) then SDPA over the revived K/V;
* ``step fused / unfused / full``: one whole layer decode step through the real attention function (``update``,
  attention, and for KVReviver the cumulative scores and compression in ``observe``), timed with CUDA events.

Each row is one context and one row combine of the sketch (``--combines median,mean``: the paper's median, and the
linear mean whose Vague tokens the kernel attends through the buckets' logits).

Kernel and SDPA times come from CUDA-graph replays (so Python launch overhead is excluded), each call preceded
by an L2 flush whose own time is measured alone and subtracted; ``revive+sdpa`` uses ``triton.testing.do_bench``
(milliseconds, so launch overhead does not matter). ``--sdpa-backends`` picks the SDPA backends of the full-cache
baseline (on torch 2.11 / H200 the default may pick cuDNN, which builds a plan for every new key length). Bytes are the
fewest each must move (see :func:`kernel_bytes`); bandwidth is bytes / time, as a share of the datasheet HBM
bandwidth of the device and of a measured device-to-device copy. Each context also checks the kernel against the
pure-torch reference. Rows go to ``--out`` (JSONL; a rerun skips finished contexts).

Usage: python benchmarks/bench_decode_attention.py [--contexts 8192,32768,131072] [--batch 1] [--out FILE]
"""

from __future__ import annotations

import itertools
import json
import statistics
import types
from pathlib import Path

from cli_args import BenchmarkParser, int_list, require_cuda, require_triton

require_triton()  # before the imports below: the decode kernel's module needs it

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvreviver_core import attention
from kvreviver_core.budget import Budget
from kvreviver_core.kernels import reviver_decode, reviver_decode_reference
from kvreviver_core.methods.full import FullLayer
from kvreviver_core.methods.reviver import ReviverLayer
from kvreviver_core.results import ResultStore

# Datasheet HBM bandwidth (bytes/s) by device-name substring, most specific first.
HBM_PEAK = [("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H200", 4.8e12), ("A100", 2.0e12)]
# Knobs of reviver_decode swept per context and combine: the defaults, then each of these values in turn
KNOBS = {"median": ("BLOCK_VAGUE", "NUM_WARPS", "PROGRAMS_PER_SM", "NUM_STAGES", "BLOCK_EXACT", "BLOCK_MASS"),
         "mean": ("BLOCK_LINEAR", "NUM_WARPS", "PROGRAMS_PER_SM_LINEAR", "NUM_STAGES_LINEAR", "BLOCK_EXACT",
                  "VAGUE_RANGES", "VAGUE_HEADS", "RUN_TILE", "PASS_WARPS", "SPLIT_BALANCE", "EXACT_BESIDE",
                  "BLOCK_MASS", "EXACT_WARPS", "MIN_VAGUE_RANGE")}
VARIATIONS = {"median": {"BLOCK_EXACT": (16,), "BLOCK_VAGUE": (16,)},
              "mean": {"VAGUE_RANGES": (32, 128), "VAGUE_HEADS": (16,), "BLOCK_LINEAR": (128,), "SPLIT_BALANCE": (1, 8),
                       "PROGRAMS_PER_SM_LINEAR": (2, 8), "NUM_STAGES_LINEAR": (2,), "BLOCK_EXACT": (64,),
                       "RUN_TILE": (2048, 8192), "EXACT_BESIDE": (0,), "BLOCK_MASS": (1024, 4096),
                       "EXACT_WARPS": (8,)}}


def default_config(combine: str) -> tuple:
    """The knobs' values in reviver_decode now, in KNOBS order."""
    return tuple(getattr(reviver_decode, knob) for knob in KNOBS[combine])


def one_at_a_time(combine: str) -> list[tuple]:
    """The built-in sweep: the defaults, then the defaults with one knob changed to each value of VARIATIONS."""
    knobs = KNOBS[combine]
    defaults = default_config(combine)
    configs = [defaults]
    for knob, values in VARIATIONS[combine].items():
        for value in values:
            config = list(defaults)
            config[knobs.index(knob)] = value
            configs.append(tuple(config))
    return configs


def knob_grid(spec: str, combine: str) -> list[tuple]:
    """The configurations of ``--grid`` (``"KNOB=a,b;KNOB=c"``): every combination of the listed values, the other
    knobs at their defaults, the defaults first."""
    knobs = KNOBS[combine]
    defaults = default_config(combine)
    values = [[value] for value in defaults]
    for item in filter(None, spec.split(";")):
        name, _, listed = item.partition("=")
        if name not in knobs:
            raise ValueError(f"--grid: {name!r} is not a knob of the {combine} combine ({', '.join(knobs)})")
        try:
            values[knobs.index(name)] = [int(v) for v in listed.split(",")]
        except ValueError:
            raise ValueError(f"--grid: {name}'s values must be integers, got {listed!r}") from None
    return [defaults] + [c for c in itertools.product(*values) if c != defaults]


FLUSH_BYTES = 256 * 1024 * 1024  # larger than the L2 of an H100 (50 MB) or H200 (60 MB)


def hbm_peak(name: str) -> float | None:
    return next((peak for key, peak in HBM_PEAK if key in name), None)


def copy_bandwidth() -> float:
    """Measured device-to-device copy, bytes read + written per second."""
    from triton.testing import do_bench

    src = torch.randn(256 * 1024 * 1024, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def kernel_bytes(layer: ReviverLayer, query_heads: int) -> dict[str, int]:
    """The fewest bytes one fused decode attention over the kept maps moves: each input read once, each output
    written once."""
    b, h, e = layer.exact_pos.shape
    length, elt = layer.logical_len, layer.exact_keys.element_size()
    filled = int((layer.exact_pos >= 0).sum())
    return {
        "exact_kv": filled * 2 * layer.head_dim * elt,
        "exact_pos": b * h * e * 4,
        "sketch": layer.sketch.nbytes(),
        "maps": b * h * length + b * layer.sketch.rows * length * 4,  # the part map and the bucket codes, read
        "logits": b * query_heads * length * 4 * 2,  # written by the split kernel, read for the mass
        "mass": b * h * length * 4,
    }


def capture_graph(body, replays: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``body`` x ``replays``, after two warm-up calls on a side stream (which compile its kernels)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays):
            body()
    return graph


def graph_us(fn, flush, replays: int = 10, repeats: int = 7) -> float:
    """Median microseconds of ``fn`` from CUDA-graph replays of (flush, fn) x replays, minus the flushes alone."""

    def replay_ms(graph) -> float:
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    with_fn = capture_graph(lambda: (flush(), fn()), replays)
    alone = capture_graph(flush, replays)
    return (replay_ms(with_fn) - replay_ms(alone)) / replays * 1e3


def timed_rounds(configs: list[tuple], set_knobs, time_us, rounds: int) -> list[list[float]]:
    """Each configuration's times over ``rounds`` passes through all of them (``set_knobs(config)``, then
    ``time_us()``), in configuration order. The sweep takes each one's least: at 128k, the first configuration timed
    in a process read 6-7 µs slower than the same build timed later (BENCHMARKS.md, issue 7), which a single pass
    charges to whichever configuration comes first, the defaults."""
    times: list[list[float]] = [[] for _ in configs]
    for _ in range(rounds):
        for config, measured in zip(configs, times):
            set_knobs(config)
            measured.append(time_us())
    return times


def compiled_resources() -> list[dict]:
    """Registers and spills of every compiled variant of the split kernel (Triton's cache, best effort)."""
    found = []
    for caches in getattr(reviver_decode._decode_split, "device_caches", {}).values():
        for kernel in caches[0].values():
            constants = getattr(kernel, "constants", {}) or {}
            found.append({"n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None),
                          "constants": {str(k): v for k, v in constants.items() if isinstance(v, (int, bool))}})
    return found


def timed_steps(step, repeats: int = 10, warmup: int = 3) -> float:
    """Median microseconds of ``step()`` with CUDA events (each call mutates the layer, so no do_bench)."""
    times = []
    for index in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        if index >= warmup:
            times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def layer_step(layer, heads: int, head_dim: int, batch: int, scaling: float):
    """One decode step of ``layer`` through the registered attention function (update, attention, observe)."""
    module = types.SimpleNamespace(layer_idx=0)
    inputs = [torch.randn(3, batch, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    state = {"i": 0}

    def step():
        q, k, v = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        keys, values = layer.update(k, v)
        attention.announce_layer(0, layer)
        attention.kvreviver_attention(module, q, keys, values, None, scaling)

    return step


def inplace_maps(layer: ReviverLayer, key_valid: torch.Tensor) -> tuple:
    """What the in-place store keeps for ``layer``'s decode attention: the part map, the positions' bucket codes,
    the length on the device and, under the linear combine, the positions' bucket order (else None)."""
    length, sketch = layer.logical_len, layer.sketch
    codes = reviver_decode.slot_codes(sketch, length)
    order = reviver_decode.bucket_order(codes, length, sketch.width) if sketch.combine == "mean" else None
    return (reviver_decode.part_map(layer.exact_pos, key_valid), codes,
            torch.full((1,), length, dtype=torch.long, device="cuda"), order)


def run_context(context: int, combine: str, args, do_bench, backends) -> dict:
    b, h, d = args.batch, args.heads, args.head_dim
    scaling = d**-0.5
    gen = torch.Generator(device="cuda").manual_seed(context)
    rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    keys, values = rand(b, h, context, d), rand(b, h, context, d)
    layer = ReviverLayer(0, Budget(args.budget), fused=True, combine=combine)
    layer.update(keys, values)
    scores = torch.rand(b, h, context, device="cuda", generator=gen)
    layer.observe(scores, torch.ones(b, context, dtype=torch.bool, device="cuda"))
    new_k, new_v, query = rand(b, h, 1, d), rand(b, h, 1, d), rand(b, h, 1, d)
    layer.update(new_k, new_v)
    layer._decode = None  # the kernel is called directly below
    full_k, full_v = torch.cat([keys, new_k], dim=2), torch.cat([values, new_v], dim=2)
    del keys, values
    key_valid = torch.ones(b, layer.logical_len, dtype=torch.bool, device="cuda")
    store = (layer.exact_keys, layer.exact_values, layer.exact_pos)

    ref_out, ref_mass = reviver_decode_reference(query, *store, layer.sketch, key_valid, scaling)
    out, mass = reviver_decode.reviver_decode_triton(query, *store, layer.sketch, key_valid, scaling)
    check = {"out_rel_err": float((out.float() - ref_out.float()).norm() / ref_out.float().norm()),
             "mass_max_abs_err": float((mass - ref_mass).abs().max())}
    del ref_out, ref_mass

    flush_buffer = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    flush = flush_buffer.zero_
    length = layer.logical_len
    part, codes, length_tensor, order = inplace_maps(layer, key_valid)

    def attend(sketch):
        return reviver_decode.decode_attention(query, *store, sketch, part, codes, length_tensor, length, scaling,
                                               order=order)

    knobs = KNOBS[combine]
    configs = knob_grid(args.grid, combine) if args.grid else one_at_a_time(combine)
    defaults = default_config(combine)

    def set_knobs(config: tuple) -> None:
        for knob, value in zip(knobs, config):
            setattr(reviver_decode, knob, value)

    rounds = timed_rounds(configs, set_knobs, lambda: graph_us(lambda: attend(layer.sketch), flush), args.rounds)
    sweep = {"/".join(map(str, config)): min(times) for config, times in zip(configs, rounds)}
    best = min(sweep, key=sweep.get)
    set_knobs(configs[list(sweep).index(best)])
    exact_only = graph_us(lambda: attend(None), flush)
    set_knobs(defaults)
    with_maps = graph_us(lambda: reviver_decode.reviver_decode_triton(query, *store, layer.sketch, key_valid, scaling),
                         flush)
    with sdpa_kernel(backends):
        sdpa = graph_us(lambda: F.scaled_dot_product_attention(query, full_k, full_v, scale=scaling), flush)
    del flush_buffer

    def revive_sdpa():
        k, v = layer.revive()
        return F.scaled_dot_product_attention(query, k, v, scale=scaling)

    revive = do_bench(revive_sdpa, return_mode="median") * 1e3
    moved = kernel_bytes(layer, h)
    exact_tokens = int((layer.exact_pos >= 0)[:, 0].sum(-1).float().mean())
    step_fused = timed_steps(layer_step(layer, h, d, b, scaling))
    layer.fused = False
    step_unfused = timed_steps(layer_step(layer, h, d, b, scaling))
    del layer
    full = FullLayer(0, Budget(1.0))
    full.update(full_k, full_v)
    full.observe(None, key_valid)
    del full_k, full_v
    step_full_default = timed_steps(layer_step(full, h, d, b, scaling))
    with sdpa_kernel(backends):
        step_full = timed_steps(layer_step(full, h, d, b, scaling))
    del full
    torch.cuda.empty_cache()

    total = sum(moved.values())
    full_bytes = 2 * b * h * (context + 1) * d * 2
    kernel_us = sweep[best]
    return {
        "exact_tokens_per_head": exact_tokens, "kernel_us": kernel_us, "kernel_config": best,
        "kernel_knobs": "/".join(knobs), "sweep_us": sweep, "sweep_rounds_us": dict(zip(sweep, rounds)),
        "kernel_with_maps_us": with_maps, "exact_only_us": exact_only, "sdpa_full_us": sdpa, "revive_sdpa_us": revive,
        "step_fused_us": step_fused, "step_unfused_us": step_unfused, "step_full_us": step_full,
        "step_full_default_sdpa_us": step_full_default, "compiled": compiled_resources(),
        "kernel_bytes": total, "kernel_bytes_parts": moved, "sdpa_bytes": full_bytes,
        "kernel_GBps": total / kernel_us / 1e3, "sdpa_GBps": full_bytes / sdpa / 1e3,
        "speedup_vs_sdpa": sdpa / kernel_us, **check,
    }


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int_list, default="8192,32768,131072")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--combines", default="median,mean", help="the sketch's row combines, one row each")
    parser.add_argument("--sdpa-backends", default="flash,efficient,math",
                        help="SDPA backends of the full-cache baseline (flash, efficient, math, cudnn)")
    parser.add_argument("--grid", default="",
                        help='sweep these knob values instead of the built-in configurations: "KNOB=a,b;KNOB=c"')
    parser.add_argument("--rounds", type=int, default=2,
                        help="passes through the swept configurations; each one's least time counts")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_decode_attention.jsonl"))
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    try:
        for combine in args.combines.split(","):
            knob_grid(args.grid, combine)
    except ValueError as error:
        parser.error(str(error))
    require_cuda("it times the Triton kernel against SDPA")
    from triton.testing import do_bench

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
    backends = [names[name] for name in args.sdpa_backends.split(",")]
    device = torch.cuda.get_device_name()
    peak = hbm_peak(device)
    copy = copy_bandwidth()
    print(f"device: {device}; datasheet HBM {peak / 1e12 if peak else float('nan'):.2f} TB/s; "
          f"measured copy {copy / 1e12:.2f} TB/s (read + write)", flush=True)
    store = ResultStore(args.out, ("device", "context", "combine", "batch", "heads", "head_dim", "budget"))
    rows = []
    for context in args.contexts:
        for combine in args.combines.split(","):
            key = {"device": device, "context": context, "combine": combine, "batch": args.batch,
                   "heads": args.heads, "head_dim": args.head_dim, "budget": args.budget}
            done = [r for r in store.rows if all(r.get(k) == v for k, v in key.items())]
            row = done[0] if done else {**key, "copy_TBps": copy / 1e12, "sdpa_backends": args.sdpa_backends,
                                        **run_context(context, combine, args, do_bench, backends)}
            if not done:
                store.append(row)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{device}, batch {args.batch}, {args.heads} heads x {args.head_dim}, bf16, budget {args.budget:g}")
    print("| context | combine | kernel µs | exact-only µs | SDPA full µs | speed-up | revive+SDPA µs | kernel MB | "
          "GB/s | % HBM peak | % copy | step fused / unfused / full (default SDPA) µs |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        share = f"{100 * r['kernel_GBps'] * 1e9 / peak:.0f}%" if peak else "n/a"
        print(f"| {r['context']} | {r['combine']} | {r['kernel_us']:.1f} ({r['kernel_config']}) | {r['exact_only_us']:.1f} | "
              f"{r['sdpa_full_us']:.1f} | {r['speedup_vs_sdpa']:.2f}x | {r['revive_sdpa_us']:.0f} | "
              f"{r['kernel_bytes'] / 1e6:.1f} | {r['kernel_GBps']:.0f} | {share} | "
              f"{100 * r['kernel_GBps'] / (r['copy_TBps'] * 1e3):.0f}% | "
              f"{r['step_fused_us']:.0f} / {r['step_unfused_us']:.0f} / {r['step_full_us']:.0f} "
              f"({r['step_full_default_sdpa_us']:.0f}) |")


if __name__ == "__main__":
    main()
