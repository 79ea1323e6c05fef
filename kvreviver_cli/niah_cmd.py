"""`kvreviver niah`: needle-in-a-haystack grid (depth x length) over methods at one budget, with heatmaps.

Rows go to ``--out/results.jsonl`` as each grid point finishes; a rerun with the same setup skips them (resume
after a kill). Heatmaps: ``--out/heatmap_<method>.png`` per method and ``--out/heatmaps.png`` side by side.
``torchrun --nproc-per-node N -m kvreviver_cli niah ...`` shares the grid points out over N processes (one GPU each)
and gives the same rows and output (see :mod:`kvreviver_core.distributed`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvreviver_cli.common import (
    DEVICE_MAP_HELP, UsageError, check_device_map, check_out_path, clean_errors, console, err_console, parse_floats,
    parse_ints, parse_names,
)
from kvreviver_cli.config import apply_config
from kvreviver_core import distributed
from kvreviver_core.results import ResultStore

if TYPE_CHECKING:  # niah imports torch, plots matplotlib: both are imported where they are used
    from kvreviver_core import niah, plots

MIN_NEW_TOKENS = 24  # SmolLM2 writes one token per digit and answers in a full sentence


def score_table(rows: list[dict], methods: list[str], lengths: list[int], title: str) -> Table:
    """Mean score per method (rows) and per length (columns), and over the whole grid."""
    table = Table(title=title, title_justify="left")
    table.add_column("method")
    for length in lengths:
        table.add_column(f"{length}", justify="right")
    table.add_column("mean", justify="right")
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        cells = [_fmt([r["score"] for r in mine if r["length"] == n]) for n in lengths]
        table.add_row(method, *cells, _fmt([r["score"] for r in mine]))
    return table


def _fmt(scores: list[float]) -> str:
    return f"{sum(scores) / len(scores):.2f}" if scores else "-"


def save_heatmaps(rows: list[dict], methods: list[str], depths: list[float], lengths: list[int], out: Path,
                  title: str) -> list[plots.Heatmap]:
    """One PNG per method and one with every method side by side, all on the same colour scale."""
    import numpy as np

    from kvreviver_core import niah, plots

    matrices = {m: np.array(niah.mean_scores(rows, m, depths, lengths)) for m in methods}
    saved = [plots.plot_method(matrices[m], m, depths, lengths, out / f"heatmap_{_file_safe(m)}.png", title)
             for m in methods]
    saved.append(plots.plot_side_by_side(matrices, depths, lengths, out / "heatmaps.png", title))
    return saved


def _file_safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)


def _needle(needle: str | None, question: str | None, answer: str | None) -> niah.Needle | None:
    from kvreviver_core import niah

    given = [x is not None for x in (needle, question, answer)]
    if not any(given):
        return None
    if not all(given):
        raise UsageError("--needle, --question and --answer go together: give all three or none")
    return niah.Needle(needle, question, answer)


@clean_errors
def niah_command(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model",
                                        help="HF hub id or local folder (default: the embedded SmolLM2)."),
    methods: str = typer.Option("full,kvreviver,h2o,streaming,snapkv", "--methods",
                                help="Comma-separated methods; options as name:key=value "
                                     "(e.g. kvreviver:estimator=mean)."),
    budget: float = typer.Option(0.25, "--budget",
                                 help="Fraction of the full cache's memory for the context, in (0, 1]."),
    lengths: str = typer.Option("1000,2000,4000,8000", "--lengths", help="Context lengths in tokens."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", "--depths", help="Needle depths, fractions in [0, 1]."),
    haystack: Optional[Path] = typer.Option(None, "--haystack", help="A .txt file or a folder of .txt files "
                                            "(default: Python's pydoc_data.topics)."),
    needle: Optional[str] = typer.Option(None, "--needle", help="A fixed needle sentence (with --question, --answer)."),
    question: Optional[str] = typer.Option(None, "--question", help="The question that asks for the needle."),
    answer: Optional[str] = typer.Option(None, "--answer", help="The expected answer."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random passkey needles (one per grid point)."),
    questions_per_context: int = typer.Option(1, "--questions-per-context",
                                              help="K needles and K questions per document, one compressed context."),
    question_after_context: bool = typer.Option(True, "--question-after-context/--question-in-prompt",
                                                help="Compress the document alone, then ask (default); "
                                                     "or ask in the prompt."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens",
                                       help=f"Tokens generated per answer (>= {MIN_NEW_TOKENS})."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."),
    out: Path = typer.Option(Path("niah-results"), "--out", help="Folder for results.jsonl (resumable) and heatmaps."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with these options (\\[niah] table)."),
) -> None:
    values = {k: v for k, v in locals().items() if k not in ("ctx", "config")}
    o = apply_config(ctx, config, values, "niah")
    if o["max_new_tokens"] < MIN_NEW_TOKENS:
        raise UsageError(f"--max-new-tokens must be >= {MIN_NEW_TOKENS} (a correct answer in a full sentence is cut "
                         f"off below that), got {o['max_new_tokens']}")
    from kvreviver_core import niah

    grid = niah.NiahGrid(
        methods=parse_names(o["methods"]), budget=o["budget"], lengths=parse_ints(o["lengths"], "--lengths"),
        depths=parse_floats(o["depths"], "--depths"), seed=o["seed"],
        needle=_needle(o["needle"], o["question"], o["answer"]), questions_per_context=o["questions_per_context"],
        question_after_context=o["question_after_context"], max_new_tokens=o["max_new_tokens"],
    )
    rows, store, model_name = run_grid(grid, o["model"], o["dtype"], o["device"], o["haystack"], o["out"],
                                       o["device_map"])
    title = (f"NIAH, {model_name}, budget {grid.budget:g}, question {grid.mode.replace('-', ' ')}, "
             f"{grid.questions_per_context} question(s) per context, seed {grid.seed}")
    console.print(score_table(rows, grid.methods, grid.lengths, title))
    saved = save_heatmaps(rows, grid.methods, grid.depths, grid.lengths, o["out"], title)
    console.print(f"results: {store.path}; heatmaps: {', '.join(str(h.path) for h in saved)}", highlight=False)


def run_grid(grid: niah.NiahGrid, model: str | None, dtype: str, device: str, haystack: Path | None,
             out: Path, device_map: str | None = None) -> tuple[list[dict], ResultStore, str]:
    """Load the model and haystack, run ``grid`` with a progress bar into ``out/results.jsonl`` (resumes).

    Returns the grid's rows, the store and the model's label. Under torchrun (WORLD_SIZE > 1) each rank first runs
    its share of the grid points (all methods of a point together) into its own rank file; rank 0 folds those into
    ``out/results.jsonl`` and goes on as a single process would, finding every row stored; the other ranks exit.
    """
    from kvreviver_core import niah
    from kvreviver_core.models import load_model

    check_device_map(device, device_map)
    check_out_path(out)
    results = out / "results.jsonl"
    # Read once on every rank, before the model loads: a results file that is not this command's fails each rank
    # here with its one line, where under torchrun rank 0 alone would fail later, at its fold, after every rank had
    # loaded the model (torchrun then ends the others).
    ResultStore(results, niah.KEY_FIELDS)
    haystack_text = niah.load_haystack(haystack)
    rank = distributed.RankInfo.from_env()
    net, tokenizer = load_model(model, dtype, distributed.rank_device(device, rank), device_map=device_map)
    limit = getattr(net.config, "max_position_embeddings", None)
    if limit is not None and max(grid.lengths) + 128 + grid.max_new_tokens > limit:
        raise UsageError(f"--lengths up to {max(grid.lengths)} plus the question and {grid.max_new_tokens} new tokens "
                         f"exceed the model's {limit} positions")
    model_name = model or "embedded SmolLM2-135M-Instruct"
    haystack_name = str(haystack) if haystack else niah.PYDOC_HAYSTACK

    def run(store: ResultStore, points: list[tuple[int, float]] | None, show: bool) -> list[dict]:
        total = len(grid.methods) * (len(grid.lengths) * len(grid.depths) if points is None else len(points))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=True, disable=not show) as progress:
            task = progress.add_task("niah", total=total)

            def step(method: str, length: int, depth: float, skipped: bool) -> None:
                progress.update(task, advance=1, description=f"{method} {length} tokens, depth {depth:g}"
                                                             + (" (stored)" if skipped else ""))

            return niah.run_niah(net, tokenizer, grid, haystack_text, store, model_name, haystack_name, step, points)

    if rank.distributed:
        points = list(grid.points())
        # A point's cost grows with its tokens (prefill, attention); its methods all run on the same rank.
        mine = distributed.my_items([length + grid.max_new_tokens for length, _ in points], rank)
        with distributed.RankSession(results, niah.KEY_FIELDS, rank) as rank_store:
            run(rank_store, [points[i] for i in mine], show=rank.main)
        if not rank.main:
            raise typer.Exit()
    distributed.fold_rank_files(results, niah.KEY_FIELDS)  # a killed torchrun run's rows count as done
    store = ResultStore(results, niah.KEY_FIELDS)
    return run(store, None, show=True), store, model_name
