"""Where one KVReviver decode step's GPU time goes, kernel by kernel (issue 7, benchmark 1's why).

Llama-2-7B shapes (32 heads, head_dim 128, bf16), budget 10%, one real ``ReviverLayer`` per context and row combine
(``profile_compress_step.prefilled_layer``, then one decode token appended). Under ``torch.profiler`` it runs ``--calls`` times:

* ``attention``: the decode attention over the kept maps (``reviver_decode.decode_attention``, through the bucket
  order under the linear combine, as the in-place step runs it);
* ``step``: a whole in-place decode step of the layer through the registered attention function (append, the
  attention, the position pass and Algorithm 3).

and prints each GPU kernel's mean time per call, with its share. One JSON line per (context, combine, part) goes to
``--out``. With ``--timeline`` (attention only) it instead replays the attention from a CUDA graph, each replay
after an L2 flush as in benchmark 1, and prints each kernel's median start and end in µs from the attention's first
kernel: which launches overlap and which one ends last. With ``--plain`` it only runs the parts (3 warm-up calls,
then ``--calls``), with no profiler of its own, so that Nsight Compute can read the kernels' counters
(``ncu_decode_kernels.sh``).

Usage on a GPU machine: python benchmarks/profile_decode_kernels.py [--contexts 8192,32768] [--combines median,mean]
[--parts attention,step] [--plain | --timeline]
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_decode_attention import FLUSH_BYTES, capture_graph, inplace_maps, layer_step
from profile_compress_step import prefilled_layer
from trace_layer_timeline import gpu_kernels, replay_spans

from kvreviver_core.kernels import reviver_decode
from cli_args import BenchmarkParser, int_list, require_cuda


def kernel_times(fn, calls: int) -> dict[str, float]:
    """Mean microseconds per call of every GPU kernel ``fn`` launches (warmed up first)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0:
            times[event.key[:60]] += event.self_device_time_total / calls
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def kernel_timeline(fn, calls: int) -> dict[str, tuple[float, float]]:
    """Each kernel of ``fn`` with its median (start, end) in µs from ``fn``'s first kernel, over ``calls`` graph
    replays of (L2 flush, ``fn``) under torch's profiler (:func:`replay_spans`)."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda").zero_
    graph = capture_graph(lambda: (flush(), fn()))
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            graph.replay()
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return replay_spans(gpu_kernels(trace), calls)


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int_list, default="8192,32768")
    parser.add_argument("--combines", default="median,mean")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--parts", default="attention,step")
    parser.add_argument("--plain", action="store_true", help="run the parts without torch.profiler (for ncu)")
    parser.add_argument("--timeline", action="store_true",
                        help="the attention's kernels on the GPU's timeline, from graph replays")
    parser.add_argument("--out", type=Path, default=Path("runs/profile_decode_kernels.jsonl"))
    args = parser.parse_args()
    unknown = set(args.parts.split(",")) - {"attention", "step"}
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(sorted(unknown))} (attention, step)")
    if args.timeline and (args.plain or args.parts != "attention"):
        parser.error("--timeline replays the attention alone: give --parts attention, without --plain")
    require_cuda("it times the Triton kernels")
    device = torch.cuda.get_device_name()
    h, d = args.heads, 128
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for context in args.contexts:
        for combine in args.combines.split(","):
            layer = prefilled_layer(context, h, d, args.budget, combine=combine)
            gen = torch.Generator(device="cuda").manual_seed(context + 1)
            rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
            layer.update(rand(1, h, 1, d), rand(1, h, 1, d))
            layer._decode = None
            query = rand(1, h, 1, d)
            length = layer.logical_len
            key_valid = torch.ones(1, length, dtype=torch.bool, device="cuda")
            part, codes, length_tensor, order = inplace_maps(layer, key_valid)
            store = (layer.exact_keys, layer.exact_values, layer.exact_pos, layer.sketch)
            parts = {
                "attention": lambda: reviver_decode.decode_attention(query, *store, part, codes, length_tensor,
                                                                     length, d**-0.5, order=order),
                "step": layer_step(layer, h, d, 1, d**-0.5),
            }
            for name in args.parts.split(","):
                fn = parts[name]
                if args.plain:
                    for _ in range(3 + args.calls):
                        fn()
                    torch.cuda.synchronize()
                    continue
                row = {"device": device, "context": context, "combine": combine, "part": name}
                if args.timeline:
                    spans = kernel_timeline(fn, args.calls)
                    row["timeline_us"] = spans
                    lines = ["median µs from its first kernel"] + [
                        f"  {start:7.1f} - {end:7.1f}  ({end - start:6.1f})  {kernel}"
                        for kernel, (start, end) in sorted(spans.items(), key=lambda kv: kv[1])]
                else:
                    times = kernel_times(fn, args.calls)
                    total = sum(times.values())
                    row.update(gpu_us_per_call=total, kernels_us=times)
                    lines = [f"{total:.1f} us of GPU time per call"] + [
                        f"  {us:8.1f} us  {100 * us / total:5.1f}%  {kernel}" for kernel, us in times.items()]
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"\n{device}, context {context}, combine {combine}, {name}: " + "\n".join(lines))
            del layer, store, part, codes, order
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
