"""Host time of one attention layer's decode step: the full cache against KVReviver (issue 7, benchmark 2's why).

At batch 1 a whole-model decode token is host-bound (``profile_decode_e2e.py``: the GPU is busy for a third of it),
so what the cache adds on the host is what the end-to-end ratio measures. This times one layer's step in isolation,
on Llama-2-7B shapes (32 KV heads x 128, bf16, batch 1): the cache's ``update`` and the registered attention function
(:func:`kvreviver_core.attention.kvreviver_attention`: SDPA for the full cache; the fused decode kernel and the
compress step for KVReviver), exactly as the model calls them.

Each step is timed twice: the host's time to issue it (the GPU idle at its start, so nothing blocks), and the wall
time to its end (a device sync). Methods alternate for ``--rounds`` rounds in one process. Then ``cProfile`` over
KVReviver's steps lists where its host time goes.

Usage on a GPU machine: python benchmarks/bench_layer_step_host.py [--context 2048] [--steps 200] [--rounds 2]
"""

from __future__ import annotations

import cProfile
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvreviver_core.attention import kvreviver_attention
from kvreviver_core.cache import make_cache
from cli_args import BenchmarkParser, require_cuda

HEADS, HEAD_DIM = 32, 128


class _Attention(torch.nn.Module):
    layer_idx = 0


def host_model() -> torch.nn.Module:
    """A one-layer Llama for ``make_cache`` to route attention on (its weights are never run)."""
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(config)


def prefilled(method: str, context: int, budget: float, model):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    cache = make_cache(method, budget if method != "full" else 1.0, model=model)
    keys, values, query = (torch.randn(1, HEADS, context, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(3))
    keys, values = cache.update(keys, values, 0)
    kvreviver_attention(_Attention(), query, keys, values, None, HEAD_DIM**-0.5)
    return cache


def step(cache, new):
    keys, values = cache.update(new[0], new[1], 0)
    return kvreviver_attention(_Attention(), new[2], keys, values, None, HEAD_DIM**-0.5)[0]


@torch.no_grad()
def measure(method: str, args, model) -> dict:
    cache = prefilled(method, args.context, args.budget, model)
    new = [torch.randn(1, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    for _ in range(args.warmup):
        step(cache, new)
    torch.cuda.synchronize()
    issue, wall = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(cache, new)
        issued = time.perf_counter()
        torch.cuda.synchronize()
        issue.append((issued - start) * 1e6)
        wall.append((time.perf_counter() - start) * 1e6)
    return {"device": torch.cuda.get_device_name(), "method": method, "context": args.context,
            "host_issue_us_median": statistics.median(issue), "wall_us_median": statistics.median(wall),
            "cache": cache}


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=40, help="untimed steps (Triton compiles its variants)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile-top", type=int, default=18)
    parser.add_argument("--out", type=Path, default=Path("runs/layer_step_host.jsonl"))
    args = parser.parse_args()
    require_cuda("it times a decode step's host work beside the GPU's")
    model = host_model()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(args.rounds):
        for method in ("full", "kvreviver"):
            row = measure(method, args, model)
            cache = row.pop("cache")
            rows.append(row)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(f"\n{rows[0]['device']}, one layer, {HEADS} KV heads x {HEAD_DIM}, bf16, batch 1, context {args.context}")
    print("| method | host µs to issue a step (median) | wall µs to its end (median) |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['host_issue_us_median']:.1f} | {r['wall_us_median']:.1f} |")
    new = [torch.randn(1, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.enable()
        for _ in range(args.steps):
            step(cache, new)
        profiler.disable()
    torch.cuda.synchronize()
    print(f"\ncProfile of {args.steps} KVReviver steps (profiler overhead included), by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile_top)


if __name__ == "__main__":
    main()
