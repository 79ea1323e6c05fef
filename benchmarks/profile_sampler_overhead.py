"""Does the NVML sampler slow the decode loop it measures? Decode step time of one model, side by side:

* HF's own DynamicCache with SDPA (no kvreviver code in the path);
* ``measure_run`` with the ``full`` cache and no sampler;
* the same with the NVML sampler at 10 ms and at 100 ms;
* and the cost of one NVML memory reading.

Run on a GPU machine: ``python benchmarks/profile_sampler_overhead.py --arch llama-2-7b --batch 1,16``.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from kvreviver_core.generation import cache_kwargs, greedy_next
from kvreviver_core.models import load_model
from kvreviver_core.profiling import RunSpec, Timer, measure_run, nvml_reader, release_memory, synthetic_ids
from cli_args import BenchmarkParser, int_list


@torch.no_grad()
def hf_dynamic_ms(model, batch: int, context: int, steps: int) -> float:
    """Decode ms/step with HF's DynamicCache and SDPA (the same warm-up and timed steps as measure_run)."""
    model.set_attn_implementation("sdpa")
    device = next(model.parameters()).device
    ids = synthetic_ids(model.config.vocab_size, batch, context, 0, device)
    cache = DynamicCache(config=model.config)
    forward = cache_kwargs(model, cache)
    token = greedy_next(model, ids, forward, logits_to_keep=1)
    for _ in range(4):
        token = greedy_next(model, token, forward)
    with Timer(device) as timer:
        for _ in range(steps):
            token = greedy_next(model, token, forward)
    return 1000 * timer.seconds / steps


def main() -> None:
    parser = BenchmarkParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama-2-7b")
    parser.add_argument("--batch", type=int_list, default="1,16")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--trace", action="store_true", help="also print torch.profiler's top CPU ops of full decode")
    args = parser.parse_args()
    model, _ = load_model(None, "auto", "cuda", arch=args.arch, random_weights=True)
    device = next(model.parameters()).device
    release_memory(device)
    read = nvml_reader(device)
    start = time.perf_counter()
    for _ in range(200):
        read()
    print(f"{torch.cuda.get_device_name(device)}: one NVML memory reading takes "
          f"{(time.perf_counter() - start) / 200 * 1e6:.0f} us")
    spec = dict(method="full", budget=1.0, context=args.context, new_tokens=args.steps + 4, decode_warmup=4)
    for batch in args.batch:
        results = {"HF DynamicCache+SDPA": hf_dynamic_ms(model, batch, args.context, args.steps)}
        for label, memory, interval in [("full, no sampler", None, 0.01), ("full, NVML every 10 ms", read, 0.01),
                                        ("full, NVML every 100 ms", read, 0.1), ("full, no sampler (again)", None, 0.01)]:
            row = measure_run(model, RunSpec(**spec, sample_interval_s=interval), batch, memory)
            results[label] = 1000 * row.decode_s / row.decode_steps_timed
        for label, ms in results.items():
            print(f"batch {batch:3d}  {label:26s} {ms:7.2f} ms/step  {batch * 1000 / ms:8.1f} tok/s")
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
            measure_run(model, RunSpec(**{**spec, "new_tokens": 9}), 1)
        print(trace.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
