"""`kvreviver calibrate`: fit a calibrated method (vector, echokv) to a model, once, and cache the result.

The activations come from the model itself on a text sample (default: the builtin ``pydoc_data.topics`` prose,
its calibration part; benchmarks evaluate on the held-out part). The fit runs on the CPU; the model's forward passes
run on ``--device``. The weights go to a small safetensors file with a JSON of the settings next to it; by default
in the per-model calibration cache, where ``make_cache`` finds them without ``weights=``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvreviver_cli.common import UsageError, check_out_path, clean_errors, console, err_console

ECHOKV_ONLY = ("--keep", "--group-size", "--local-size")


# --tokens' default, kvreviver_core.calibration.CALIBRATION_TOKENS, is in its help text rather than read from that
# module here: it imports torch, which the CLI's help and usage errors do without (tests/test_cli_import_time.py
# checks that the two agree).
@clean_errors
def calibrate_command(
    method: str = typer.Option(..., "--method", help="vector (ridge regression value ~ key) or echokv (head reconstruction)."),
    model: Optional[str] = typer.Option(None, "--model", help="HF id or local folder; default: the embedded SmolLM2."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text to calibrate on; default: builtin prose."),
    steps: Optional[int] = typer.Option(None, "--steps", help="echokv: AdamW steps per training stage (default 200)."),
    out: Optional[Path] = typer.Option(None, "--out", help="the .safetensors file to write; default: the model's cache."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="calibration tokens (512-token sequences; default 4096)."),
    keep: Optional[float] = typer.Option(None, "--keep", help="echokv: fraction of KV heads stored exactly (0.4)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="echokv: heads per group S (largest divisor <= 4)."),
    local_size: Optional[int] = typer.Option(None, "--local-size", help="echokv: layers a head is rebuilt from, m (2)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda: where the model runs."),
) -> None:
    from kvreviver_core.calibration import CALIBRATION_CHUNK, CALIBRATION_TOKENS, calibrate, settings_path
    from kvreviver_core.models import load_model

    if method not in ("vector", "echokv"):
        raise UsageError(f"--method must be vector or echokv, got {method!r}")
    echokv_options = {"keep": keep, "group_size": group_size, "local_size": local_size}
    given = {name: value for name, value in echokv_options.items() if value is not None}
    if method != "echokv" and given:
        raise UsageError(f"{', '.join(ECHOKV_ONLY)} are echokv options; vector takes none of them")
    if steps is not None and method == "vector":
        raise UsageError("vector is fitted in closed form and takes no --steps")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be a positive integer, got {steps}")
    if keep is not None and not 0 < keep < 1:
        raise UsageError(f"--keep must be a fraction in (0, 1), got {keep:g}")
    if any(size is not None and size < 1 for size in (group_size, local_size)):
        raise UsageError("--group-size and --local-size must be positive integers")
    tokens = CALIBRATION_TOKENS if tokens is None else tokens
    if tokens < 2 * CALIBRATION_CHUNK:
        raise UsageError(f"--tokens must cover at least 2 chunks of {CALIBRATION_CHUNK} tokens, got {tokens}")
    if text is not None and not text.is_file():
        raise UsageError(f"--text {text} is not a file")
    if out is not None and out.suffix != ".safetensors":
        raise UsageError(f"--out must name a .safetensors file, got {out}")
    check_out_path(out, folder=False)
    dtype = "float32" if device == "cpu" else "auto"
    with err_console.status(f"loading {model or 'the embedded SmolLM2'}", spinner="dots"):
        loaded, tokenizer = load_model(model, dtype=dtype, device=device)
    if tokenizer is None:
        raise UsageError("calibration needs a model with a tokenizer")
    if method == "echokv":
        from kvreviver_core.methods.echokv import calibration_plan

        calibration_plan(loaded.config.num_hidden_layers, loaded.config.num_key_value_heads, **given)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
               TimeElapsedColumn())
    # Shown from the first report on, so that what fails before (a text too short for --tokens) is one line alone.
    progress = Progress(*columns, console=err_console)
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int, loss: float | None) -> None:
        if not tasks:
            progress.start()
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total, loss="")
        progress.update(tasks[stage], completed=done, loss="" if loss is None else f"loss {loss:.4f}")

    try:
        path = calibrate(method, loaded, tokenizer, text, steps, out, tokens=tokens, progress=report, **given)
    finally:
        if tasks:  # stopping a display never started would still print a line
            progress.stop()
    settings = json.loads(settings_path(path).read_text())
    console.print(f"wrote {path} and {settings_path(path).name} ({settings['seconds']} s)")
    if "heldout_loss" in settings:
        losses = settings["heldout_loss"]
        console.print("held-out relative error (K/V | attention output): " + ", ".join(
            f"{stage} {value['kv']:.3f} | {value['attention']:.3f}" for stage, value in losses.items()))
    if "heldout_relative_error" in settings:
        console.print(f"held-out relative error of value ~ key: {settings['heldout_relative_error']:.3f}")
