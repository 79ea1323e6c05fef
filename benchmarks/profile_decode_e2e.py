"""Where a whole-model decode token's time goes, full cache against KVReviver (issue 7, benchmark 2's why).

For each context and method: the Llama-2-7B architecture with random weights (bf16), a prefill of random ids, a few
untimed decode tokens, then ``--tokens`` decode tokens through the same loop as ``kvreviver profile`` (model forward,
greedy argmax), each timed with a device sync. Then ``torch.profiler`` over ``--profiled`` more tokens counts, per
token: kernel launches, host waits on the GPU (``cudaStreamSynchronize``: a device tensor read by the host), and the
GPU's busy time (the sum of kernel times: KVReviver's Algorithm 3 runs on a side stream, beside the other kernels,
so this can exceed the wall time), and the GPU's idle time (no kernel of any stream running; ``--gaps N`` prints
which kernels it precedes). Compression folds tokens every ``recent_slack + 1`` steps (9 by default), so
``--profiled 9`` covers one fold per layer. For KVReviver it also counts the Vague tokens swapped back per layer, KV head and token.

``--modes eager,graphs`` measures each method twice: with every step launched from Python, and with the steps
replayed from CUDA graphs (``kvreviver_core/graphs.py``; the full cache then decodes in its static layout, as
transformers' StaticCache does). ``--blocks plain,compiled`` measures everything again after compiling the model's
decoder layers (``kvreviver_core/compiled.py``), in the same process. ``--kernels N`` prints each run's N kernels
that take the most GPU time a token. One JSON line per (context, mode, method) in ``--out``; a table at the end. ``--rounds 2`` measures every (context, method)
twice, alternating, so that a process's first runs (Triton compiling kernel variants, host caches warming) show. SDPA runs on flash/efficient/math (no cuDNN,
as in ``bench_decode_e2e.py``).

Usage on a GPU machine: python benchmarks/profile_decode_e2e.py [--contexts 8192,32768] [--tokens 16]
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from kvreviver_core.compiled import compile_token_blocks
from kvreviver_core.generation import cache_kwargs, greedy_next
from kvreviver_core.models import random_model
from kvreviver_core.graphs import GraphedDecode
from kvreviver_core.profiling import profiled_cache, synthetic_ids
from kvreviver_core.specs import method_spec
from cli_args import BenchmarkParser, int_list, require_cuda

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch")


def idle_before_kernels(prof, tokens: int) -> tuple[float, dict[str, float]]:
    """The GPU's idle time a token (µs) between the profiled kernels of all streams, and how much of it ended at each
    kernel (by name): what a kernel boundary costs beyond the kernels' own time. The idle time between tokens (the
    host's loop) ends at a token's first kernel."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    idle, busy_until = defaultdict(float), None
    for start, end, name in spans:
        if busy_until is not None and start > busy_until:
            idle[name[:90]] += (start - busy_until) / tokens
        busy_until = end if busy_until is None else max(busy_until, end)
    return sum(idle.values()), dict(sorted(idle.items(), key=lambda kv: -kv[1]))


def swapped_back_per_head(cache, step) -> float:
    """Vague tokens that entered the exact store during ``step()``, per layer and KV head."""
    before = [layer.exact_map() for layer in cache.layers]
    token = step()
    entered = sum(int((after[:, :, : b.shape[-1]] & ~b).sum()) for b, after in
                  zip(before, (layer.exact_map() for layer in cache.layers)))
    return token, entered / (len(cache.layers) * before[0].shape[0] * before[0].shape[1])


@torch.no_grad()
def measure(model, method: str, context: int, mode: str, args) -> dict:
    ids = synthetic_ids(model.config.vocab_size, 1, context, 0, torch.device("cuda"))
    budget = 1.0 if method_spec(method)[0] == "full" else args.budget
    cache = profiled_cache(method, budget, model, mode == "graphs")
    forward = cache_kwargs(model, cache)
    token = greedy_next(model, ids, forward, logits_to_keep=1)
    runner = GraphedDecode(model, cache, forward) if mode == "graphs" else None
    step = runner.step if runner is not None else lambda t: greedy_next(model, t, forward)
    for _ in range(args.warmup):
        token = step(token)
    walls = []
    for _ in range(args.tokens):
        torch.cuda.synchronize()
        start = time.perf_counter()
        token = step(token)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) * 1e3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.profiled):
            token = step(token)
        torch.cuda.synchronize()
    if args.trace is not None:  # the streams' timeline (chrome://tracing, Perfetto)
        args.trace.mkdir(parents=True, exist_ok=True)
        trace_file = f"{method.replace(':', '_').replace('=', '-')}_{context}_{mode}.json.gz"  # a file name's characters
        prof.export_chrome_trace(str(args.trace / trace_file))
    events = prof.key_averages()
    if args.ops:
        print(f"\n## {method}, context {context}: ops by calls over {args.profiled} tokens")
        print(events.table(sort_by="count", row_limit=args.ops, max_name_column_width=50))
    count = lambda names: sum(e.count for e in events if e.key in names) / args.profiled  # noqa: E731
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: -e.self_device_time_total)
    gpu_us = sum(e.self_device_time_total for e in kernels)
    if args.kernels:
        print(f"\n## {method}, context {context}, {mode}: GPU time a token, by kernel")
        print("| kernel | launches / token | µs / token |\n|---|---:|---:|")
        for e in kernels[: args.kernels]:
            print(f"| `{e.key[:90]}` | {e.count / args.profiled:.0f} | {e.self_device_time_total / args.profiled:.1f} |")
    idle_us, idle_by_kernel = idle_before_kernels(prof, args.profiled)
    if args.gaps:
        print(f"\n## {method}, context {context}, {mode}: GPU idle a token, {idle_us:.1f} µs, by the kernel it ends at")
        print("| kernel | idle µs / token |\n|---|---:|")
        for name, us in list(idle_by_kernel.items())[: args.gaps]:
            print(f"| `{name}` | {us:.1f} |")
    row = {"device": torch.cuda.get_device_name(), "context": context, "method": method, "mode": mode,
           "wall_ms_median": statistics.median(walls),
           "wall_ms_mean": statistics.mean(walls), "gpu_busy_ms": gpu_us / 1e3 / args.profiled,
           "gpu_idle_ms": idle_us / 1e3, "launches": count(LAUNCHES), "host_syncs": count(("cudaStreamSynchronize",))}
    if method != "full":
        swaps = []
        for _ in range(4):
            token, entered = swapped_back_per_head(cache, lambda: step(token))
            swaps.append(round(entered, 3))
        row["swapped_back_per_layer_head"] = swaps
    if runner is not None:
        row["graph_steps"] = runner.steps
    del cache, runner
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama-2-7b")
    parser.add_argument("--contexts", type=int_list, default="8192,32768")
    parser.add_argument("--methods", default="full,kvreviver")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16, help="timed decode tokens")
    parser.add_argument("--profiled", type=int, default=3, help="decode tokens under torch.profiler")
    parser.add_argument("--kernels", type=int, default=0, help="print each run's N kernels with the most GPU time")
    parser.add_argument("--blocks", default="plain", help="plain, compiled (the model's decoder layers compiled "
                        "first) or plain,compiled")
    parser.add_argument("--gaps", type=int, default=0, help="print the N kernels after the most GPU idle time a token")
    parser.add_argument("--ops", type=int, default=0, help="print the profiler's N most-called ops per run")
    parser.add_argument("--rounds", type=int, default=1, help="measure every (context, method) this many times")
    parser.add_argument("--modes", default="eager", help="eager (each step from Python), graphs (steps replayed from "
                        "CUDA graphs, the full cache in its static layout), or both: eager,graphs")
    parser.add_argument("--trace", type=Path, default=None, help="also write each run's profiler trace (Chrome JSON, "
                        "gzipped) into this folder, for the streams' timeline")
    parser.add_argument("--out", type=Path, default=Path("runs/profile_decode_e2e.jsonl"))
    args = parser.parse_args()
    require_cuda("it measures kernel launches and GPU time")
    model = random_model(args.arch, torch.bfloat16, torch.device("cuda"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        for blocks in args.blocks.split(","):
            if blocks == "compiled":  # from here on, for every method alike
                compile_token_blocks(model)
            for round_ in range(1, args.rounds + 1):
                for context in args.contexts:
                    for mode in args.modes.split(","):
                        for method in args.methods.split(","):
                            row = {**measure(model, method, context, mode, args), "blocks": blocks, "round": round_}
                            rows.append(row)
                            with args.out.open("a") as f:
                                f.write(json.dumps(row) + "\n")
                            print(json.dumps(row), flush=True)
    print(f"\n{rows[0]['device']}, {args.arch} random weights, bf16, batch 1, budget {args.budget:g}")
    print("| blocks | round | context | mode | method | ms / token, mean (median) | GPU busy ms / token |"
          " GPU idle ms / token | launches / token | host syncs / token |"
          " Vague tokens swapped back per layer, head and token |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['blocks']} | {r['round']} | {r['context']} | {r['mode']} | {r['method']} | {r['wall_ms_mean']:.1f} ({r['wall_ms_median']:.1f}) | "
              f"{r['gpu_busy_ms']:.1f} | {r['gpu_idle_ms']:.2f} | {r['launches']:.0f} | {r['host_syncs']:.0f} | "
              f"{r.get('swapped_back_per_layer_head', '-')} |")


if __name__ == "__main__":
    main()
