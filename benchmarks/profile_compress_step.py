"""Where one KVReviver decode step of one layer spends its time (issue 7), on Llama-2-7B head shapes.

For each context and estimator, a ``ReviverLayer`` (bf16, budget 0.1) gets a random prefill with random cumulative
scores, as in ``bench_decode_attention.py``; then decode steps of random q/k/v go through the registered attention
(update, fused kernel, ``observe``: cumulative scores and compression). Printed: the median step time, how many
Vague tokens each step swaps back per KV head, and ``torch.profiler``'s top ops by device time and by host time over
the profiled steps (host synchronisations show as ``aten::_local_scalar_dense`` / ``cudaStreamSynchronize``).

Usage on a GPU machine: python benchmarks/profile_compress_step.py [--contexts 8192] [--estimators sum,mean]
"""

from __future__ import annotations


import torch
from bench_decode_attention import layer_step, timed_steps
from torch.profiler import ProfilerActivity, profile

from kvreviver_core.budget import Budget
from kvreviver_core.methods.reviver import ReviverLayer
from cli_args import BenchmarkParser, int_list


def prefilled_layer(context: int, heads: int, head_dim: int, budget: float, **options) -> ReviverLayer:
    """A fused ``ReviverLayer`` (bf16) after a random prefill of ``context`` tokens and its compress step;
    ``options``: the layer's (estimator, combine, ...)."""
    gen = torch.Generator(device="cuda").manual_seed(context)
    keys, values = (torch.randn(1, heads, context, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                    for _ in range(2))
    layer = ReviverLayer(0, Budget(budget), fused=True, **options)
    layer.update(keys, values)
    scores = torch.rand(1, heads, context, device="cuda", generator=gen)
    layer.observe(scores, torch.ones(1, context, dtype=torch.bool, device="cuda"))
    return layer


def swapped_in_per_head(layer: ReviverLayer, step) -> float:
    before = layer.exact_map()
    step()
    after = layer.exact_map()[:, :, : before.shape[-1]]
    return float((after & ~before).sum()) / (before.shape[0] * before.shape[1])


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int_list, default="8192")
    parser.add_argument("--estimators", default="sum,mean")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=10, help="profiled steps")
    parser.add_argument("--rows", type=int, default=18, help="ops listed per table")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    for context in args.contexts:
        for estimator in args.estimators.split(","):
            layer = prefilled_layer(context, args.heads, args.head_dim, args.budget, estimator=estimator)
            step = layer_step(layer, args.heads, args.head_dim, 1, args.head_dim**-0.5)
            swaps = [swapped_in_per_head(layer, step) for _ in range(5)]
            median_us = timed_steps(step)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
            print(f"\n## context {context}, estimator {estimator}: step {median_us:.0f} us (median of 10); "
                  f"Vague tokens swapped back per KV head in 5 steps: {swaps}")
            table = prof.key_averages()
            print(table.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=40))
            print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))
            del layer, step


if __name__ == "__main__":
    main()
