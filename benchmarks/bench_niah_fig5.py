"""The paper's Figure 5 on the embedded SmolLM2: NIAH at a 25% budget, 1k-8k tokens, 5 depths, every method, in
both modes (question after the compressed context, and question inside the prompt).

It runs the same grid as ``kvreviver niah`` (kvreviver_core.niah.run_niah), in phases ordered so that the most
telling numbers come first: the full cache at 1k-4k (the sanity bar, mean >= 0.9), then every method in both
modes, one length at a time from the shortest. Rows go to ``--out/results.jsonl``; a rerun resumes where a kill left it. At the end it prints
the Markdown table for BENCHMARKS.md (mean score per method and length, both modes side by side, the device) and
writes heatmaps per mode under ``--out/<mode>/``.

Usage: python benchmarks/bench_niah_fig5.py [--out runs/niah-fig5] [--device cpu] [--lengths 1000,...]
       [--methods full,kvreviver,...] [--report-only]
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
import transformers

from kvreviver_cli.niah_cmd import save_heatmaps
from kvreviver_core import niah
from kvreviver_core.methods import list_methods
from kvreviver_core.models import load_model
from kvreviver_core.results import ResultStore
from cli_args import BenchmarkParser, int_list

FIGURE5_METHODS = ["full", "kvreviver", "h2o", "streaming", "snapkv", "cam", "kvreviver:estimator=mean"]
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
MODES = {"after-context": True, "in-prompt": False}
MODEL_NAME = "embedded SmolLM2-135M-Instruct"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def phases(methods: list[str], lengths: list[int]) -> list[tuple[str, list[str], list[int]]]:
    """(mode, methods, lengths) in the order they run: the full cache up to 4k, then each length in both modes."""
    order = [("after-context", ["full"], [n for n in lengths if n <= 4000])]
    order += [(mode, methods, [n]) for n in sorted(lengths) for mode in MODES]
    return [(mode, m, n) for mode, m, n in order if m and n]


def grid(mode: str, methods: list[str], lengths: list[int], budget: float) -> niah.NiahGrid:
    return niah.NiahGrid(methods=methods, budget=budget, lengths=lengths, depths=DEPTHS, seed=0,
                         question_after_context=MODES[mode], max_new_tokens=32)


def markdown_table(rows: list[dict], methods: list[str], lengths: list[int]) -> str:
    """Methods down, lengths across, the two modes side by side (after-context | in-prompt), then the means."""
    head = ["method"] + [f"{n // 1000}k {short}" for n in lengths for short in ("after", "in")] + ["mean after",
                                                                                                 "mean in"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells = [f"`{method}`"]
        for n in lengths:
            for mode in MODES:
                cell = [r["score"] for r in rows if (r["method"], r["length"], r["mode"]) == (method, n, mode)]
                cells.append(_mean(cell))
        for mode in MODES:
            cells.append(_mean([r["score"] for r in rows if (r["method"], r["mode"]) == (method, mode)]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seconds_table(rows: list[dict], methods: list[str], lengths: list[int]) -> str:
    """Mean wall seconds per answer (prefill + generation), question after context."""
    head = ["method"] + [f"{n // 1000}k" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells = [f"`{method}`"]
        for n in lengths:
            times = [r["seconds"] for r in rows
                     if (r["method"], r["length"], r["mode"]) == (method, n, "after-context")]
            cells.append(f"{sum(times) / len(times):.0f}" if times else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean(scores: list[float]) -> str:
    return f"{sum(scores) / len(scores):.2f} ({len(scores)})" if scores else "-"


def main() -> None:
    parser = BenchmarkParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/niah-fig5"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--lengths", type=int_list, default="1000,2000,4000,8000")
    parser.add_argument("--methods", default=",".join(FIGURE5_METHODS))
    parser.add_argument("--report-only", action="store_true", help="Print the tables from the stored rows only.")
    args = parser.parse_args()
    lengths = args.lengths
    methods = [m for m in args.methods.split(",") if m.split(":")[0] in list_methods()]
    missing = [m for m in args.methods.split(",") if m not in methods]
    store = ResultStore(args.out / "results.jsonl", niah.KEY_FIELDS)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    model, tokenizer = load_model(None, dtype=dtype, device=args.device)
    device = device_name(next(model.parameters()).device)
    haystack = niah.load_haystack()
    if not args.report_only:
        start = time.perf_counter()
        for mode, phase_methods, phase_lengths in phases(methods, lengths):
            def step(method, length, depth, skipped, mode=mode):
                state = "stored" if skipped else f"{time.perf_counter() - start:.0f} s"
                print(f"[{mode}] {method} {length} depth {depth:g}: {state}", flush=True)

            niah.run_niah(model, tokenizer, grid(mode, phase_methods, phase_lengths, args.budget), haystack, store,
                          MODEL_NAME, niah.PYDOC_HAYSTACK, step)
    rows = [r for r in store.rows if r["budget"] == args.budget and r["model"] == MODEL_NAME]
    full_short = [r["score"] for r in rows
                  if r["method"] == "full" and r["mode"] == "after-context" and r["length"] <= 4000]
    print(f"\nDevice: {device}; torch {torch.__version__}, transformers {transformers.__version__}, {dtype}")
    print(f"Budget {args.budget:g}, depths {DEPTHS}, pydoc haystack, seed 0, 32 new tokens, score = mean over depths "
          f"(points in parentheses). Methods not registered here: {', '.join(missing) or 'none'}.")
    print(f"Full cache, question after context, 1k-4k: mean {_mean(full_short)}\n")
    print(markdown_table(rows, methods, lengths))
    print("\nMean seconds per answer (question after context):\n")
    print(seconds_table(rows, methods, lengths))
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        if mine:
            save_heatmaps(mine, methods, DEPTHS, lengths, args.out / mode,
                          f"NIAH, SmolLM2, budget {args.budget:g}, question {mode.replace('-', ' ')}")


if __name__ == "__main__":
    main()
