"""`kvreviver sweep-ratios`: KVReviver's Vague/Candidate/Recent split, one task run per split (the paper's Tables 2-3).

Each split runs the task with kvreviver at one budget; the full cache runs once per prompt, shared by every split
(fidelity needs it). Rows go to ``--out/results.jsonl`` as they finish, and ``--out/sweep.csv`` is rewritten after
each split, so a killed sweep resumes where it stopped and recomputes nothing.

The score is the paper's ROUGE-1 against the references where the dataset has them, else ROUGE-L against the full
cache's output (fidelity), and the table's header says which. With ``--task niah`` the score is the mean needle score
over the grid; each split is the method spec ``kvreviver:split=V/C/R`` of one `niah` grid (rows resume per grid point).
Under torchrun the ranks share out the prompt batches (eval) or grid points (niah) of every split at once.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kvreviver_cli import eval_cmd, niah_cmd
from kvreviver_cli.common import UsageError, clean_errors, console, parse_floats, parse_ints
from kvreviver_cli.config import apply_config
from kvreviver_core.budget import Budget

Split = tuple[float, float, float]


def _equal_candidate_recent(vague: float) -> Split:
    rest = round((1.0 - vague) / 2, 6)
    return (vague, rest, rest)


# The paper's grids (arXiv 2512.17917) and the ROUGE-1 it reports for each row (XSum, 10% budget, Llama-2-7B-chat).
PAPER_TABLES: dict[str, list[tuple[Split, float]]] = {
    "2": [(_equal_candidate_recent(v), r1) for v, r1 in
          [(0.1, 35.7), (0.15, 35.2), (0.2, 34.4), (0.3, 34.1), (0.4, 33.3)]],
    "3": [((0.1, 0.7, 0.2), 32.9), ((0.1, 0.6, 0.3), 34.5), ((0.1, 0.5, 0.4), 35.6), ((0.1, 0.45, 0.45), 35.7),
          ((0.1, 0.4, 0.5), 35.0), ((0.1, 0.3, 0.6), 35.5)],
}
TASKS = ("eval", "niah")
CSV_FIELDS = ("vague", "candidate", "recent", "budget", "score_name", "score", "paper_rouge1", "rougeL_vs_full",
              "first_token_match", "kv_memory_fraction", "prompts")


def parse_splits(text: str) -> list[Split]:
    """``"0.1,0.45,0.45;0.2,0.4,0.4"`` -> splits, each checked by :class:`Budget` (3 parts >= 0 summing to 1)."""
    splits = []
    for part in text.split(";"):
        if part.strip():
            splits.append(Budget(0.1, split=tuple(parse_floats(part, "--splits"))).split)
    if not splits:
        raise UsageError('--splits needs at least one split, e.g. "0.1,0.45,0.45;0.2,0.4,0.4"')
    return splits


def chosen_splits(table: Optional[str], splits: Optional[str]) -> tuple[list[Split], list[Optional[float]]]:
    """The splits to run and the paper's ROUGE-1 for each (None for splits of one's own)."""
    if (table is None) == (splits is None):
        raise UsageError("give either --table 2|3 (the paper's grids) or --splits \"V,C,R;V,C,R\"")
    if table is not None:
        if table not in PAPER_TABLES:
            raise UsageError(f"unknown --table {table!r}; the paper's split tables are {', '.join(PAPER_TABLES)}")
        return [s for s, _ in PAPER_TABLES[table]], [r for _, r in PAPER_TABLES[table]]
    parsed = parse_splits(splits)
    return parsed, [None] * len(parsed)


def sweep_table(rows: list[dict], title: str) -> Table:
    """The paper's layout: Vague, Candidate, Recent, score; the best score's row in bold green."""
    score_name = rows[0]["score_name"] if rows else "score"
    table = Table(title=title, caption=f"best {score_name} highlighted")
    for name in ("Vague Ratio", "Candidate Ratio", "Recent Ratio"):
        table.add_column(name, justify="right")
    table.add_column(score_name, justify="right")
    with_paper = any(row["paper_rouge1"] is not None for row in rows)
    if with_paper:
        table.add_column("paper ROUGE-1", justify="right")
    table.add_column("KV mem %", justify="right")
    best = max(range(len(rows)), key=lambda i: rows[i]["score"]) if rows else -1
    for i, row in enumerate(rows):
        cells = [f"{row['vague']:g}", f"{row['candidate']:g}", f"{row['recent']:g}", f"{100 * row['score']:.1f}"]
        if with_paper:
            cells.append("-" if row["paper_rouge1"] is None else f"{row['paper_rouge1']:.1f}")
        cells.append(f"{100 * row['kv_memory_fraction']:.1f}")
        table.add_row(*cells, style="bold green" if i == best else None)
    return table


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.partial")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)  # a kill never leaves a half-written CSV


def sweep_eval(values: dict, splits: list[Split], paper: list[Optional[float]], budget: float) -> list[dict]:
    """Run `eval`'s task with kvreviver at each split; return one CSV row per split finished."""
    settings = eval_cmd.settings_from(values)
    eval_cmd.check_out(values["out"])
    task = eval_cmd.load_task(settings)
    with_reference = task.dataset.has_references
    score_name = "ROUGE-1" if with_reference else "ROUGE-L vs full"
    split_runs = [eval_cmd.runs_for(["kvreviver"], [budget], split) for split in splits]
    # Under torchrun, every split's rows first, sharded by prompt batch; the loop below then finds them stored.
    eval_cmd.run_sharded(task, list(dict.fromkeys(run for runs in split_runs for run in runs)), values["out"])
    store = eval_cmd.open_store(values["out"])
    rows = []
    for split, runs, paper_rouge1 in zip(splits, split_runs, paper):
        console.print(f"split V/C/R {'/'.join(f'{s:g}' for s in split)}", highlight=False)
        eval_cmd.run_task(task, runs, store)
        entry = eval_cmd.summarize(task, runs[1:], store)[0]
        score = entry["reference_rouge"]["rouge1"] if with_reference else entry["rougeL_vs_full"]
        rows.append({"vague": split[0], "candidate": split[1], "recent": split[2], "budget": budget,
                     "score_name": score_name, "score": score, "paper_rouge1": paper_rouge1,
                     "rougeL_vs_full": entry["rougeL_vs_full"], "first_token_match": entry["first_token_match"],
                     "kv_memory_fraction": entry["memory_fraction"], "prompts": entry["prompts"]})
        write_csv(values["out"] / "sweep.csv", rows)
    if not with_reference:
        console.print(eval_cmd.NO_REFERENCE_NOTE + " " + eval_cmd.FIDELITY_NOTE, highlight=False)
    return rows


def sweep_niah(values: dict, splits: list[Split], budget: float) -> list[dict]:
    """Run `niah`'s grid with kvreviver at each split (and the full cache once, for reference); one row per split.

    Each split is a method spec (``kvreviver:split=V/C/R``), so its grid points are keyed apart in results.jsonl.
    """
    from kvreviver_core import niah

    specs = [niah.split_spec("kvreviver", split) for split in splits]
    grid = niah.NiahGrid(methods=["full", *specs], budget=budget, lengths=parse_ints(values["lengths"], "--lengths"),
                         depths=parse_floats(values["depths"], "--depths"), seed=values["seed"],
                         question_after_context=values["question_after_context"],
                         max_new_tokens=values["max_new_tokens"])
    found, _, _ = niah_cmd.run_grid(grid, values["model"], values["dtype"], values["device"], values["haystack"],
                                    values["out"], values["device_map"])
    full = [r["score"] for r in found if r["method"] == "full"]
    console.print(f"full cache: mean needle score {sum(full) / len(full):.2f} over {len(full)} points",
                  highlight=False)
    rows = []
    for split, spec in zip(splits, specs):
        mine = [r for r in found if r["method"] == spec]
        rows.append({"vague": split[0], "candidate": split[1], "recent": split[2], "budget": budget,
                     "score_name": "needle score", "score": sum(r["score"] for r in mine) / len(mine),
                     "paper_rouge1": None, "rougeL_vs_full": None, "first_token_match": None,
                     "kv_memory_fraction": sum(r["memory_ratio"] for r in mine) / len(mine), "prompts": len(mine)})
    write_csv(values["out"] / "sweep.csv", rows)
    return rows


@clean_errors
def sweep_command(
    ctx: typer.Context,
    table: Optional[str] = typer.Option(None, help="The paper's grid: 2 (Vague share) or 3 (Candidate/Recent)."),
    splits: Optional[str] = typer.Option(None, help='Own splits, V,C,R separated by ";": "0.1,0.45,0.45;0.2,0.4,0.4".'),
    budget: float = typer.Option(0.1, help="Fraction of the full cache's memory (the paper's tables use 0.1)."),
    task: str = typer.Option("eval", help="eval (summarization) or niah."),
    model: Optional[str] = eval_cmd.MODEL,
    dtype: str = eval_cmd.DTYPE,
    device: str = eval_cmd.DEVICE,
    device_map: Optional[str] = eval_cmd.DEVICE_MAP,
    dataset: str = eval_cmd.DATASET,
    input_field: str = eval_cmd.INPUT_FIELD,
    reference_field: str = eval_cmd.REFERENCE_FIELD,
    limit: int = eval_cmd.LIMIT,
    batch_size: int = eval_cmd.BATCH_SIZE,
    max_new_tokens: int = eval_cmd.MAX_NEW_TOKENS,
    max_context: int = eval_cmd.MAX_CONTEXT,
    seed: int = eval_cmd.SEED,
    lengths: str = typer.Option("1000,2000", help="niah: context lengths in tokens."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="niah: needle depths, fractions in [0, 1]."),
    haystack: Optional[Path] = typer.Option(None, help="niah: a .txt file or folder (default: pydoc_data.topics)."),
    question_after_context: bool = typer.Option(True, "--question-after-context/--question-in-prompt",
                                                help="niah: compress the document alone, then ask (default)."),
    out: Path = typer.Option(Path("sweep-results"), help="Folder for results.jsonl (resumable) and sweep.csv."),
    config: Optional[Path] = eval_cmd.CONFIG,
) -> None:
    values = apply_config(ctx, config, {k: v for k, v in locals().items() if k not in ("ctx", "config")},
                          "sweep-ratios")
    chosen, paper = chosen_splits(None if values["table"] is None else str(values["table"]), values["splits"])
    Budget(values["budget"])  # its ValueError says what is wrong
    if values["task"] not in TASKS:
        raise UsageError(f"unknown --task {values['task']!r}; choose from {', '.join(TASKS)}")
    source = f"the paper's Table {values['table']}" if values["table"] is not None else "splits given"
    if values["task"] == "niah":
        if values["max_new_tokens"] < niah_cmd.MIN_NEW_TOKENS:
            raise UsageError(f"--max-new-tokens must be >= {niah_cmd.MIN_NEW_TOKENS} for niah, "
                             f"got {values['max_new_tokens']}")
        rows = sweep_niah(values, chosen, values["budget"])
        task = f"NIAH, {rows[0]['prompts']} points per split"
    else:
        rows = sweep_eval(values, chosen, paper, values["budget"])
        task = f"{values['dataset']}, {rows[0]['prompts']} prompts"
    eval_cmd.print_table(sweep_table(rows, f"KVReviver split sweep ({source}), budget {values['budget']:g}, {task}"))
    console.print(f"results: {values['out'] / 'results.jsonl'}, table: {values['out'] / 'sweep.csv'}", highlight=False)
