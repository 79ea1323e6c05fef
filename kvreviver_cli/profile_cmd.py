"""`kvreviver profile`: prefill time, decode tokens/s, KV memory and peak GPU memory (NVML) per method and batch.

Each (method, batch) row is one manual prefill + fixed-length greedy decode loop through the real model forward
and the method's cache (:func:`kvreviver_core.profiling.measure_run`), on synthetic token ids. Out of memory is a
row of its own ("OOM", the paper's "-"). Rows go to ``--out/profile.jsonl`` as they finish, and a rerun with the
same setup skips them; ``--out/profile.json`` holds the whole result.

``--device-map auto`` spreads the model's layers over every visible GPU (accelerate); every cache keeps each
layer's storage on that layer's GPU, and memory is read through NVML on each GPU: the table shows the sum, with
each GPU's own peak beside it.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvreviver_cli.common import (
    UsageError, check_device_map, check_out_path, clean_errors, console, err_console, parse_ints,
    parse_names,
)
from kvreviver_cli.config import apply_config
from kvreviver_core.results import ResultStore

if TYPE_CHECKING:  # torch, the method registry and the profiler are imported when the command runs
    import torch

    from kvreviver_core.profiling import ProfileRow, RunSpec

GIB = 1024**3
MIB = 1024**2
# Decode steps of each method's untimed warm-up run: enough for KVReviver to fold (every recent_slack + 1 = 9 steps
# by default) and swap, so that Triton compiles those kernels' variants there and not in the first timed row.
WARMUP_RUN_STEPS = 24


def _validate(methods: list[str], batches: list[int], budget: float, context: int, new_tokens: int,
              decode_warmup: int, max_batch_limit: int, sample_interval_ms: float) -> None:
    from kvreviver_core import list_methods
    from kvreviver_core.specs import method_spec

    if not methods:
        raise UsageError(f"unknown method(s) (none given); available: {', '.join(list_methods())}")
    for method in methods:
        try:
            method_spec(method)
        except ValueError as error:
            raise UsageError(str(error)) from None
    if not batches or min(batches) < 1:
        raise UsageError(f"--batch sizes must be integers >= 1, got {','.join(map(str, batches)) or '(none)'}")
    if not (0 < budget <= 1):
        raise UsageError(f"--budget must be a fraction in (0, 1], got {budget:g}")
    if context < 1 or new_tokens < 1:
        raise UsageError(f"--context and --new-tokens must be >= 1, got {context} and {new_tokens}")
    if decode_warmup < 0:
        raise UsageError(f"--decode-warmup must be >= 0, got {decode_warmup}")
    if max_batch_limit < 1:
        raise UsageError(f"--max-batch-limit must be >= 1, got {max_batch_limit}")
    if not (sample_interval_ms > 0):
        raise UsageError(f"--sample-interval-ms must be > 0, got {sample_interval_ms:g}")


def _check_device(device: str, device_map: str | None) -> None:
    import torch

    check_device_map(device, device_map)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("no NVIDIA GPU found (profile reads GPU memory through NVML); "
                         "pass --device cpu to time on the CPU without GPU memory figures")


def _device_name(devices: list[torch.device]) -> str:
    import torch

    if devices[0].type != "cuda":
        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    names = [torch.cuda.get_device_name(d) for d in devices]
    if len(names) == 1:
        return names[0]
    return f"{len(names)} x {names[0]}" if len(set(names)) == 1 else " + ".join(names)


def _layers_per_device(model: torch.nn.Module) -> dict[str, int]:
    """How many decoder layers each device holds (a device-mapped model's split)."""
    counts: dict[str, int] = {}
    for layer in getattr(getattr(model, "model", None), "layers", []):
        where = str(next(layer.parameters()).device)
        counts[where] = counts.get(where, 0) + 1
    return counts


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def _peaks(row: ProfileRow) -> str:
    if row.nvml_peak_bytes is None and row.torch_max_allocated_bytes is None:
        return "n/a"
    text = f"{_gib(row.nvml_peak_bytes)}/{_gib(row.torch_max_allocated_bytes)}"
    per_gpu = row.nvml_peak_per_device_bytes or row.torch_max_allocated_per_device_bytes or []
    if len(per_gpu) > 1:  # the sum over the GPUs, then each GPU's own peak
        text += " (" + "+".join(f"{value / GIB:.2f}" for value in per_gpu) + ")"
    return text


def render_table(rows: list[ProfileRow], methods: list[str], batches: list[int], title: str) -> Table:
    """Batch size against each method's decode tok/s (the paper's Table 1), then prefill and memory columns."""
    by_key = {(r.method, r.batch): r for r in rows}
    table = Table(title=title, title_justify="left")
    table.add_column("Batch", justify="right")
    columns = [("tok/s", lambda r: f"{r.decode_tokens_per_s:.1f}"), ("prefill s", lambda r: f"{r.prefill_s:.2f}"),
               ("KV MiB", lambda r: f"{r.kv_bytes / MIB:.1f}"),
               ("peak GiB NVML/torch", _peaks)]
    for label, _ in columns:
        for method in methods:
            table.add_column(f"{method} {label}", justify="right")
    for batch in batches:
        cells = [str(batch)]
        for index, (_, show) in enumerate(columns):
            for method in methods:
                row = by_key.get((method, batch))
                if row is None:
                    cells.append("")
                elif not row.ok:
                    cells.append("OOM" if index == 0 else "-")
                else:
                    cells.append(show(row))
        table.add_row(*cells)
    return table


def eager_under_graphs(rows: list[ProfileRow]) -> list[str]:
    """With --cuda-graphs: the methods none of whose decode steps replayed a graph (their caches change shape or
    read the device from the host at every step), so that their rates are not read as graphed ones."""
    eager = sorted({r.method for r in rows if r.ok and r.decode_graph_replays == 0})
    return [f"{method}: no decode step replayed a CUDA graph (its cache cannot be captured); measured eagerly"
            for method in eager]


def memory_savings(rows: list[ProfileRow], methods: list[str]) -> list[str]:
    """One line per batch: each method's NVML peak above the pre-run baseline, as a fraction of full's."""
    if "full" not in methods:
        return []
    by_key = {(r.method, r.batch): r for r in rows}
    lines = []
    for (method, batch), row in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        full = by_key.get(("full", batch))
        if method == "full" or full is None or not (row.ok and full.ok) or row.nvml_peak_bytes is None:
            continue
        mine, theirs = row.nvml_peak_bytes - row.nvml_baseline_bytes, full.nvml_peak_bytes - full.nvml_baseline_bytes
        # A small model's run can stay inside memory NVML already counted: no growth, no ratio.
        growth = f"{mine / theirs:.2f}x" if theirs > 0 else "full grew by nothing NVML saw"
        kv = f"{row.kv_bytes / full.kv_bytes:.3f}x" if full.kv_bytes > 0 else "n/a"
        lines.append(f"batch {batch}: {method} NVML peak above the loaded model {mine / GIB:.2f} GiB vs full "
                     f"{theirs / GIB:.2f} GiB ({growth}); KV held {kv}")
    return lines


@clean_errors
def profile_command(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="HF hub id or local folder (default: the embedded SmolLM2)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture preset, with --random-weights (e.g. llama-2-7b)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Random weights of --arch: no download needed."),
    methods: str = typer.Option("full,kvreviver", "--methods", help="Comma-separated methods."),
    budget: float = typer.Option(0.1, "--budget", help="Fraction of the full cache's memory, in (0, 1]."),
    batch: str = typer.Option("1,2,8,16", "--batch", help="Comma-separated batch sizes."),
    context: int = typer.Option(2048, "--context", help="Prompt tokens per sequence (synthetic ids)."),
    new_tokens: int = typer.Option(128, "--new-tokens", help="Decode steps per run (the first --decode-warmup untimed)."),
    decode_warmup: int = typer.Option(4, "--decode-warmup", help="Decode steps run before the timer starts."),
    cuda_graphs: bool = typer.Option(
        False, "--cuda-graphs", help="Replay decode steps from CUDA graphs where the cache allows it (full: static layout)."),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile the model's decoder layers first (every method alike; the cache runs eagerly): fewer kernels "
        "a token outside attention."),
    find_max_batch: bool = typer.Option(False, "--find-max-batch", help="Also find each method's largest batch that fits."),
    max_batch_limit: int = typer.Option(1024, "--max-batch-limit", help="Upper end of the --find-max-batch search."),
    device: str = typer.Option("cuda", "--device", help="cuda (NVML memory) or cpu (timing only)."),
    device_map: Optional[str] = typer.Option(
        None, "--device-map", help="auto: spread the model's layers over every visible GPU (accelerate)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."),
    sample_interval_ms: float = typer.Option(10.0, "--sample-interval-ms", help="NVML sampling interval."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic token ids."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for profile.jsonl (resumable) and profile.json."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with these options (\\[profile] table)."),
) -> None:
    values = {k: v for k, v in locals().items() if k not in ("ctx", "config")}
    import torch
    import transformers

    from kvreviver_core.compiled import compile_token_blocks
    from kvreviver_core.models import load_model
    from kvreviver_core.profiling import find_max_batch as search_max_batch
    from kvreviver_core.profiling import (
        NvmlUnavailable, ProfileRow, RunSpec, guarded, input_device, measure_run, model_devices, nvml_reader,
        release_memory,
    )

    o = apply_config(ctx, config, values, "profile")
    method_names, batches = parse_names(o["methods"]), parse_ints(o["batch"], "--batch")
    _validate(method_names, batches, o["budget"], o["context"], o["new_tokens"], o["decode_warmup"],
              o["max_batch_limit"], o["sample_interval_ms"])
    _check_device(o["device"], o["device_map"])
    check_out_path(o["out"])
    store = ResultStore(o["out"] / "profile.jsonl" if o["out"] else None, ("setup", "method", "batch"))
    if o["cuda_graphs"] and (o["device"] != "cuda" or o["device_map"] is not None):
        raise UsageError("--cuda-graphs needs --device cuda on one GPU (no --device-map)")
    net, _ = load_model(o["model"], o["dtype"], o["device"], arch=o["arch"], random_weights=o["random_weights"],
                        device_map=o["device_map"])
    devices, target = model_devices(net), input_device(net)
    release_memory(devices)  # random init leaves reserved blocks behind, which NVML would count
    limit = getattr(net.config, "max_position_embeddings", None)
    if limit is not None and o["context"] + o["new_tokens"] > limit:
        raise UsageError(f"--context + --new-tokens = {o['context'] + o['new_tokens']} exceeds the model's {limit} positions")
    memory = None
    if target.type == "cuda":
        try:
            memory = nvml_reader(devices)
        except NvmlUnavailable as exc:
            err_console.print(f"warning: {exc}; peak GPU memory comes from torch alone", highlight=False)

    setup = {"model": o["model"] or (f"{o['arch']} (random weights)" if o["arch"] else "embedded SmolLM2-135M"),
             "dtype": str(next(net.parameters()).dtype).removeprefix("torch."), "device": _device_name(devices),
             "context": o["context"], "new_tokens": o["new_tokens"], "decode_warmup": o["decode_warmup"],
             "budget": o["budget"], "seed": o["seed"]}
    if o["cuda_graphs"]:  # absent otherwise, as the device map below
        setup["cuda_graphs"] = True
    if o["compile"]:
        setup["compiled_blocks"] = len(compile_token_blocks(net))
    if o["device_map"] is not None:  # absent otherwise, so that earlier single-device results still resume
        setup["device_map"] = {"mode": o["device_map"], "layers_per_device": _layers_per_device(net)}
    spec_of = {m: RunSpec(m, o["budget"], o["context"], o["new_tokens"], o["decode_warmup"], o["seed"],
                          o["sample_interval_ms"] / 1000, o["cuda_graphs"]) for m in method_names}
    warmed: set[str] = set()

    def run(method: str, size: int) -> ProfileRow:
        for stored in store.rows:
            if stored["setup"] == setup and stored["method"] == method and stored["batch"] == size:
                return ProfileRow(**{k: v for k, v in stored.items() if k != "setup"})
        if method not in warmed:  # kernels, cuBLAS handles and allocator pools, kept out of the first timed row
            short = RunSpec(method, o["budget"], o["context"], WARMUP_RUN_STEPS, 1, o["seed"],
                            cuda_graphs=o["cuda_graphs"])
            guarded(lambda b: measure_run(net, short, b), method, size, devices)
            warmed.add(method)
        row = guarded(lambda b: measure_run(net, spec_of[method], b, memory), method, size, devices)
        store.append({"setup": setup, **row.to_dict()})
        return row

    grid: list[ProfileRow] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task("profile", total=len(method_names) * len(batches))
        for method in method_names:
            for size in batches:
                progress.update(task, description=f"{method} batch {size}")
                grid.append(run(method, size))
                progress.advance(task)
        max_batch: dict[str, int] = {}
        if o["find_max_batch"]:
            for method in method_names:
                progress.update(task, description=f"{method}: largest batch that fits")
                fitting = [r.batch for r in grid if r.method == method and r.ok]
                start = min(max(fitting, default=1), o["max_batch_limit"])
                max_batch[method] = search_max_batch(lambda b: run(method, b).ok, start, o["max_batch_limit"])

    title = (f"{setup['model']}, {setup['dtype']}, context {o['context']}, {o['new_tokens']} new tokens "
             f"(decode tok/s after {min(o['decode_warmup'], o['new_tokens'] - 1)} warm-up steps), budget "
             f"{o['budget']:g}{', decode steps replayed from CUDA graphs' if o['cuda_graphs'] else ''}"
             f"{', decoder layers compiled' if o['compile'] else ''} — {setup['device']}")
    console.print(render_table(grid, method_names, batches, title))
    if memory is None:
        console.print(f"NVML memory is unavailable on {target.type}: the NVML peak was not measured.")
    if len(devices) > 1:
        split = ", ".join(f"{where} {count}" for where, count in _layers_per_device(net).items())
        console.print(f"model spread over {len(devices)} GPUs (decoder layers: {split}); peak memory is the sum "
                      "of each GPU's own peak, which is in brackets, GPU by GPU", highlight=False)
    for line in eager_under_graphs(grid) + memory_savings(grid, method_names):
        console.print(line, highlight=False)
    probes = {(r["method"], r["batch"]): r for r in store.rows if r["setup"] == setup}
    for method, found in max_batch.items():
        best = probes.get((method, found))
        speed = f", {best['decode_tokens_per_s']:.1f} tok/s there" if best and best["status"] == "ok" else ""
        console.print(f"{method}: largest batch that fits = {found} (searched up to {o['max_batch_limit']}){speed}")
    if o["out"]:
        o["out"].mkdir(parents=True, exist_ok=True)
        report = {"setup": setup, "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                  "devices": [str(d) for d in devices], "methods": method_names, "rows": [r.to_dict() for r in grid], "max_batch": max_batch,
                  "probes": [{k: v for k, v in r.items() if k != "setup"} for r in store.rows if r["setup"] == setup]}
        (o["out"] / "profile.json").write_text(json.dumps(report, indent=2))
        console.print(f"wrote {o['out'] / 'profile.json'}")
