"""Time the prefill attention of the methods that score tokens (KVReviver, H2O, ...), side by side in one process.

Backends (``--backends``), all on the same random inputs, causal (an unpadded prompt, ``--padded`` for a batch whose
rows after the first are left-padded by a quarter of the prompt, through a boolean mask):

* ``torch``: :func:`kvreviver_core.attention.scored_attention`, the output and the softmax probabilities' column sums,
  chunked so that no chunk's fp32 logits exceed ``CHUNK_ELEMENTS``;
* ``triton``: :func:`kvreviver_core.kernels.scored_prefill.scored_attention_triton`, the same results with no logits
  in memory (CUDA);
* ``sdpa``: the output alone, through the SDPA call the full cache's prefill makes (the floor: no scores).

For each it prints the best of ``--repeats`` runs after a warm-up, and for ``triton`` the largest difference from
``torch`` in the output and in the scores (relative to the largest score). With ``--kernels``, one more run under
``torch.profiler`` gives each kernel's device time (``kernels_ms`` in the row). Rows go to ``--out`` (JSONL).

Usage: python benchmarks/bench_scored_prefill.py [--batch 1] [--heads 32] [--kv-heads 32] [--tokens 8192,32768]
       [--head-dim 128] [--dtype bfloat16] [--device cuda] [--backends torch,triton,sdpa] [--padded] [--repeats 3] [--kernels]
       [--out runs/bench_scored_prefill.jsonl]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kvreviver_core.attention import _sdpa, scored_attention
from cli_args import BenchmarkParser, int_list, require_cuda, require_triton


def backends(names: list[str], parser: BenchmarkParser) -> dict:
    table = {"torch": scored_attention, "sdpa": lambda q, k, v, mask, scaling, _: (_sdpa(q, k, v, mask, scaling), None)}
    if "triton" in names:
        require_triton()
        from kvreviver_core.kernels.scored_prefill import scored_attention_triton

        table["triton"] = scored_attention_triton
    unknown = [name for name in names if name not in table]
    if unknown:
        parser.error(f"unknown backend {unknown[0]!r} (choose from torch, triton, sdpa)")
    return {name: table[name] for name in names}


def kernel_times(run) -> dict[str, float]:
    """Device milliseconds of each kernel in one ``run()``, by name, longest first."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    times = {event.key: event.self_device_time_total / 1e3 for event in prof.key_averages()
             if event.self_device_time_total > 0}
    return dict(sorted(times.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--tokens", type=int_list, default="8192,32768")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default="torch,triton,sdpa")
    parser.add_argument("--padded", action="store_true", help="left-pad the rows after the first (a boolean mask)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernels", action="store_true", help="each kernel's device time, from one profiled run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_scored_prefill.jsonl"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        require_cuda("--device cuda; --device cpu runs the torch and sdpa backends")
    timed = backends(args.backends.split(","), parser)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for tokens in args.tokens:
        gen = torch.Generator().manual_seed(0)
        shape = lambda heads: (args.batch, heads, tokens, args.head_dim)  # noqa: E731
        query = torch.randn(shape(args.heads), generator=gen).to(device, dtype)
        key, value = (torch.randn(shape(args.kv_heads), generator=gen).to(device, dtype) for _ in range(2))
        mask = None
        if args.padded:
            causal = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
            mask = causal.expand(args.batch, 1, tokens, tokens).clone()
            mask[1:, :, :, : tokens // 4] = False
        results = {}
        for backend, fn in timed.items():
            times = []
            for _ in range(args.repeats + 1):  # the first run warms up (and compiles)
                sync()
                start = time.perf_counter()
                results[backend] = fn(query, key, value, mask, args.head_dim**-0.5, None)
                sync()
                times.append(time.perf_counter() - start)
            row = {"device": name, "backend": backend, "batch": args.batch, "heads": args.heads,
                   "kv_heads": args.kv_heads, "tokens": tokens, "head_dim": args.head_dim, "dtype": args.dtype,
                   "padded": args.padded, "best_s": min(times[1:]), "threads": torch.get_num_threads()}
            if args.kernels and device.type == "cuda":
                row["kernels_ms"] = kernel_times(lambda: fn(query, key, value, mask, args.head_dim**-0.5, None))
            if backend == "triton" and "torch" in results:
                (out, scores), (ref_out, ref_scores) = results["triton"], results["torch"]
                row["max_out_diff"] = float((out.float() - ref_out.float()).abs().max())
                row["max_score_diff_rel"] = float((scores - ref_scores).abs().max() / ref_scores.abs().max())
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        results.clear()


if __name__ == "__main__":
    main()
