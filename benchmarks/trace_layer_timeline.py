"""A KVReviver layer's decode step on the GPU's timeline, from a trace of ``profile_decode_e2e.py --trace DIR``.

The trace holds every GPU kernel of the profiled tokens with its start, duration and stream. A layer's step starts
at its ``_append``; this prints, for each kernel of the step in launch order (the first of each name, and the
first later kernel that is not KVReviver's: the output projection), the median start and end over all layers and
tokens, in µs from the ``_append``, and the median time from one ``_append`` to the next. Two kernels of one name
in a step (``_decode_split``: the exact splits and the bucket logits; ``_position_pass``: the bucket sums and the
scores) are told apart by their order of start.

:func:`replay_spans` does the same for graph replays of attention alone (``profile_decode_kernels.py --timeline``).

Usage: python benchmarks/trace_layer_timeline.py runs/trace/kvreviver_combine-mean_32768_graphs.json.gz
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from cli_args import BenchmarkParser

STEP_START = "_append"
KVREVIVER_KERNELS = ("_append", "_decode_split", "_vague_logits", "_position_pass", "_bucket_values", "_combine",
                     "_compress")


def gpu_kernels(path: Path) -> list[dict]:
    """The trace's GPU kernels, by start time."""
    with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
        events = json.load(f)["traceEvents"]
    return sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])


def layer_timeline(kernels: list[dict]) -> tuple[dict[str, list[tuple[float, float]]], list[float]]:
    """For each kernel of a step (named with its occurrence, e.g. ``_decode_split#2``), its (start, end) in µs from
    the step's ``_append`` over every step but the last; and the steps' periods."""
    starts = [i for i, e in enumerate(kernels) if e["name"] == STEP_START]
    spans, periods = defaultdict(list), []
    for first, following in zip(starts, starts[1:]):
        t0 = kernels[first]["ts"]
        periods.append(kernels[following]["ts"] - t0)
        seen = defaultdict(int)
        model_kernel_seen = False
        for e in kernels[first:following]:
            if e["name"] in KVREVIVER_KERNELS:
                seen[e["name"]] += 1
                key = f"{e['name']}#{seen[e['name']]}"
            elif not model_kernel_seen:
                model_kernel_seen = True
                key = "next model kernel"
            else:
                continue
            spans[key].append((e["ts"] - t0, e["ts"] + e["dur"] - t0))
    return spans, periods


def replay_spans(kernels: list[dict], calls: int) -> dict[str, tuple[float, float]]:
    """From the GPU kernels of ``calls`` replays, by start (trace events: ``name``, ``ts``, ``dur``), each replay a
    flush then the same kernels: every kernel after the flush, named with its occurrence in order of start (e.g.
    ``_decode_split#2``), with its median (start, end) in µs from the replay's first kernel after the flush."""
    per_call = len(kernels) // calls
    if per_call < 2 or per_call * calls != len(kernels):
        raise SystemExit(f"the trace holds {len(kernels)} kernels, not the same number in each of {calls} replays")
    spans = defaultdict(list)
    for first in range(0, len(kernels), per_call):
        replay = kernels[first + 1:first + per_call]
        t0, seen = replay[0]["ts"], defaultdict(int)
        for e in replay:
            seen[e["name"]] += 1
            spans[f"{e['name'][:50]}#{seen[e['name']]}"].append((e["ts"] - t0, e["ts"] + e["dur"] - t0))
    return {key: (statistics.median(s for s, _ in v), statistics.median(e for _, e in v)) for key, v in spans.items()}


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    args = parser.parse_args()
    try:
        kernels = gpu_kernels(args.trace)
    except (OSError, ValueError, KeyError) as error:
        print(f"trace_layer_timeline: cannot read {args.trace}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    spans, periods = layer_timeline(kernels)
    if not periods:
        print(f"trace_layer_timeline: no two {STEP_START} kernels in {args.trace}: not a KVReviver in-place decode",
              file=sys.stderr)
        raise SystemExit(2)
    print(f"{args.trace.name}: {len(periods)} layer steps, median period {statistics.median(periods):.1f} µs")
    print("| kernel (occurrence in the step) | steps | median start µs | median end µs |\n|---|---:|---:|---:|")
    for name, times in sorted(spans.items(), key=lambda kv: statistics.median(t[0] for t in kv[1])):
        print(f"| `{name}` | {len(times)} | {statistics.median(t[0] for t in times):.1f} | "
              f"{statistics.median(t[1] for t in times):.1f} |")


if __name__ == "__main__":
    main()
