"""`kvreviver eval`: summarization scores of several methods and budgets, against references and the full cache.

Every prompt is decoded greedily by the real ``model.generate`` with each method's cache, in batches. The full
cache always runs: each method's output is compared with it (fidelity). Rows go to ``--out DIR/results.jsonl`` as
they finish, keyed by the settings that change an output, so a rerun with the same ``--out`` skips them.
``torchrun --nproc-per-node N -m kvreviver_cli eval --out DIR ...`` shares the prompt batches out over N processes
(one GPU each) and gives the same rows and table (see :mod:`kvreviver_core.distributed`).

The defaults are sized so that the command with no flags runs offline on 2 CPU cores in a few minutes: four
passages of ~1k tokens of builtin prose, 32 new tokens, budget 0.25, every method that can run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvreviver_cli.common import (
    DEVICE_MAP_HELP, UsageError, check_device_map, check_out_path, clean_errors, console, parse_floats,
    parse_names,
)
from kvreviver_cli.config import apply_config
from kvreviver_core import distributed
from kvreviver_core.budget import DEFAULT_SPLIT, Budget
from kvreviver_core.results import ResultStore

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from kvreviver_core.data import Prompt, SummarizationSet

FULL = "full"
ROW_KEY = ("settings", "prompt_id", "method", "budget", "split")
FIDELITY_NOTE = (
    "ROUGE-L vs full and 1st token = full measure fidelity: each method's output against the full cache's output "
    "for the same prompt, not against a reference summary."
)
NO_REFERENCE_NOTE = "This dataset has no reference summaries, so no reference ROUGE is reported."
MEMORY_NOTE = (
    "KV mem: cache memory_bytes() over the full cache's bytes for the same tokens without padding (a batch's left "
    "padding can put full above 100%). tok/s: tokens kept (up to EOS) per second of generate, prefill included."
)


@dataclass(frozen=True)
class EvalSettings:
    """What a task run needs; :meth:`fingerprint` holds the settings that change a prompt's output."""

    model: Optional[str] = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: Optional[str] = None
    dataset: str = "builtin"
    input_field: str = "document"
    reference_field: str = "summary"
    limit: Optional[int] = 4
    max_context: int = 1024
    max_new_tokens: int = 32
    seed: int = 0
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be at least 1, got {self.limit}")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_context < 1:
            raise UsageError(f"--max-context must be at least 1, got {self.max_context}")

    def fingerprint(self) -> dict:
        # Not limit (a larger limit extends a run), nor batch size or device (same greedy outputs, up to rounding).
        return {"model": self.model or "embedded:SmolLM2-135M-Instruct", "dtype": self.dtype, "dataset": self.dataset,
                "input_field": self.input_field, "reference_field": self.reference_field,
                "max_context": self.max_context, "max_new_tokens": self.max_new_tokens, "seed": self.seed}


@dataclass(frozen=True)
class RunSpec:
    """One (method, budget, split) to run on every prompt. The full cache has no budget or split. ``method`` is a
    method spec, ``name[:key=value...]`` (:mod:`kvreviver_core.specs`)."""

    method: str
    budget: Optional[float] = None
    split: Optional[tuple[float, float, float]] = None

    def key(self) -> dict:
        return {"method": self.method, "budget": self.budget, "split": list(self.split) if self.split else None}

    def cache_budget(self) -> Budget:
        if self.budget is None:
            return Budget(1.0)
        return Budget(self.budget, split=self.split or DEFAULT_SPLIT)

    def cache_args(self) -> tuple[str, dict]:
        """The method's name and its options (Budget fields among them override ``cache_budget()``'s)."""
        return _method_spec(self.method)

    def label(self) -> str:
        if self.budget is None:
            return self.method
        split = f" V/C/R {'/'.join(f'{s:g}' for s in self.split)}" if self.split else ""
        return f"{self.method} @ {self.budget:g}{split}"


def _method_spec(spec: str) -> tuple[str, dict]:
    from kvreviver_core.specs import method_spec  # on demand: it imports every method (and torch)

    return method_spec(spec)


def runs_for(methods: list[str], budgets: list[float], split: tuple[float, float, float]) -> list[RunSpec]:
    """The full cache first (every fidelity score needs it), then each method at each budget."""
    runs = [RunSpec(FULL)]
    for method in methods:
        if method != FULL:
            with_split = _method_spec(method)[0] == "kvreviver"
            runs += [RunSpec(method, budget, split if with_split else None) for budget in budgets]
    return runs


@dataclass
class EvalTask:
    """The loaded model and the formatted prompts of one dataset."""

    settings: EvalSettings
    model: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    dataset: "SummarizationSet"
    prompts: list["Prompt"]

    def fingerprint(self) -> dict:
        """The settings that change an output, with ``--dtype auto`` resolved (bf16 on a GPU, fp32 on a CPU)."""
        return {**self.settings.fingerprint(), "dtype": str(self.model.dtype).removeprefix("torch.")}


def load_task(settings: EvalSettings) -> EvalTask:
    """Read the dataset (files and the hub first, so their errors come before the model load), then the model.

    Under torchrun the model goes to this rank's GPU, and ranks other than 0 print nothing from here on.
    """
    from kvreviver_core import data, models

    rank = distributed.RankInfo.from_env()
    if not rank.main:
        console.quiet = True

    def load(tokenizer):
        return data.load_examples(settings.dataset, tokenizer, settings.max_context, settings.limit, settings.seed,
                                  settings.input_field, settings.reference_field)

    dataset = None if settings.dataset == data.BUILTIN else load(None)
    with console.status("loading the model", spinner="dots"):
        model, tokenizer = models.load_model(settings.model, dtype=settings.dtype,
                                             device=distributed.rank_device(settings.device, rank),
                                             device_map=settings.device_map)
    dataset = dataset or load(tokenizer)
    return EvalTask(settings, model, tokenizer, dataset, data.build_prompts(dataset, tokenizer, settings.max_context))


def usable_methods(task: EvalTask, requested: list[str] | None, budgets: list[float], split) -> list[str]:
    """``requested`` (each must build a cache, else UsageError), or every registered method that builds one."""
    from kvreviver_core.cache import make_cache

    names = requested if requested is not None else list_all_methods()
    usable = []
    for name in names:
        try:
            probes = [RunSpec(FULL)] if name == FULL else runs_for([name], budgets, split)[1:]
            for run in probes:
                method, options = run.cache_args()
                make_cache(method, run.cache_budget(), model=task.model, **options)  # prepare() loads calibration
        except Exception as exc:  # any failure to build a cache: calibration missing, bad options, ...
            reason = _first_line(exc)
            if requested is not None:
                raise UsageError(f"method {name!r} cannot run: {reason}") from None
            console.print(f"[yellow]skipping {name}[/]: {reason}", highlight=False, soft_wrap=True)
            continue
        usable.append(name)
    return usable


def list_all_methods() -> list[str]:
    from kvreviver_core.methods import list_methods

    return [FULL] + [name for name in list_methods() if name != FULL]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_task(task: EvalTask, runs: list[RunSpec], store: ResultStore, optional: set[str] = frozenset(),
             only_batches: Collection[int] | None = None) -> list[RunSpec]:
    """Generate every missing (prompt, run) row, batch by batch, the full cache first in each batch.

    A run of a method in ``optional`` that fails while generating (e.g. a budget too small for it) is dropped with
    a note; any other failure is a UsageError. Rows already written stay. Returns the runs that completed.
    ``only_batches``: the numbers of the prompt batches to run (one rank's share, see :func:`run_sharded`); all if
    None.
    """
    from kvreviver_core import metrics
    from kvreviver_core.generation import generate_batch

    fingerprint = task.fingerprint()
    done = store.done_keys()
    pending = lambda run, prompt: store.key({"settings": fingerprint, "prompt_id": prompt.id, **run.key()}) not in done  # noqa: E731
    batches = prompt_batches(task)
    if only_batches is not None:
        batches = [batch for number, batch in enumerate(batches) if number in only_batches]
    prompts = [prompt for batch in batches for prompt in batch]
    total = len(runs) * len(prompts)
    full_rows = {row["prompt_id"]: row for row in store.rows if row["settings"] == fingerprint and row["method"] == FULL}
    failed: list[RunSpec] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("generating", total=total)
        progress.advance(bar, sum(not pending(run, p) for run in runs for p in prompts))
        for number, batch in enumerate(batches):
            for run in runs:
                todo = [p for p in batch if pending(run, p)] if run not in failed else []
                if not todo:
                    continue
                progress.update(bar, description=run.label())
                try:
                    name, options = run.cache_args()
                    outputs = generate_batch(task.model, task.tokenizer, [p.text for p in todo], name,
                                             run.cache_budget(), task.settings.max_new_tokens, **options)
                except (ValueError, RuntimeError) as exc:
                    if run.method not in optional:
                        raise UsageError(f"{run.label()} failed: {_first_line(exc)}") from None
                    progress.console.print(f"[yellow]dropping {run.label()}[/]: {_first_line(exc)}",
                                           highlight=False, soft_wrap=True)
                    failed.append(run)
                    progress.advance(bar, sum(pending(run, p) for later in batches[number:] for p in later))
                    continue
                for prompt, out in zip(todo, outputs):
                    row = _row(fingerprint, prompt, run, out, len(todo), full_rows.get(prompt.id), metrics)
                    store.append(row)
                    if run.method == FULL:
                        full_rows[prompt.id] = row
                    progress.advance(bar)
    return [run for run in runs if run not in failed]


def prompt_batches(task: EvalTask) -> list[list["Prompt"]]:
    """The prompts in the batches they are decoded in (a batch's padding changes its outputs, so it is one unit)."""
    size = task.settings.batch_size
    return [task.prompts[start:start + size] for start in range(0, len(task.prompts), size)]


def run_sharded(task: EvalTask, runs: list[RunSpec], out: Path, optional: set[str] = frozenset()) -> None:
    """Under torchrun (WORLD_SIZE > 1): run this rank's share of the prompt batches, every run of a batch (the full
    cache first) on the same rank, into its rank file; rank 0 folds the rank files into ``out/results.jsonl`` and
    returns, the other ranks exit. A single process returns at once. Either way :func:`run_task` then finds the
    rows stored.
    """
    rank = distributed.RankInfo.from_env()
    if not rank.distributed:
        return
    batches = prompt_batches(task)
    # A batch's cost: its padded prompt and the new tokens, for each of its prompts.
    costs = [len(batch) * (max(p.prompt_tokens for p in batch) + task.settings.max_new_tokens) for batch in batches]
    mine = set(distributed.my_items(costs, rank))
    with distributed.RankSession(out / "results.jsonl", ROW_KEY, rank) as store:
        run_task(task, runs, store, optional, only_batches=mine)
    if not rank.main:
        raise typer.Exit()


def _row(fingerprint: dict, prompt, run: RunSpec, out, batch: int, full_row: dict | None, metrics) -> dict:
    row = {"settings": fingerprint, "prompt_id": prompt.id, **run.key(), "text": out.text, "token_ids": out.token_ids,
           "prompt_tokens": out.prompt_tokens, "truncated": prompt.truncated, "new_tokens": len(out.token_ids),
           "memory_bytes": out.memory_bytes, "full_bytes": out.full_bytes, "seconds": out.seconds / batch,
           "batch_size": batch, "finished_at": time.time()}
    row["reference_rouge"] = metrics.rouge_f(prompt.reference, out.text) if prompt.reference is not None else None
    full_text, full_ids = (out.text, out.token_ids) if full_row is None else (full_row["text"], full_row["token_ids"])
    match = metrics.fidelity(out.text, out.token_ids, full_text, full_ids)
    row["rougeL_vs_full"], row["first_token_match"] = match.rouge_l_vs_full, match.first_token_match
    return row


def summarize(task: EvalTask, runs: list[RunSpec], store: ResultStore) -> list[dict]:
    """One entry per run: mean scores over this task's prompts (scores as fractions), memory share, tokens/s."""
    from kvreviver_core.metrics import ROUGE_TYPES

    fingerprint = task.fingerprint()
    order = {p.id: i for i, p in enumerate(task.prompts)}
    summary = []
    for run in runs:
        key = run.key()
        # In prompt order, so that the sums do not depend on the order the rows were written in (ranks, resumes).
        rows = sorted((r for r in store.rows if r["settings"] == fingerprint and r["prompt_id"] in order
                       and all(r.get(k) == v for k, v in key.items())), key=lambda r: order[r["prompt_id"]])
        if not rows:
            continue
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        entry = {**key, "prompts": len(rows),
                 "rougeL_vs_full": mean([r["rougeL_vs_full"] for r in rows]),
                 "first_token_match": mean([float(r["first_token_match"]) for r in rows]),
                 "memory_fraction": mean([r["memory_bytes"] / r["full_bytes"] for r in rows if r["full_bytes"]] or [0.0]),
                 "tokens_per_second": sum(r["new_tokens"] for r in rows) / max(1e-9, sum(r["seconds"] for r in rows))}
        if all(r["reference_rouge"] is not None for r in rows):
            entry["reference_rouge"] = {name: mean([r["reference_rouge"][name] for r in rows]) for name in ROUGE_TYPES}
        summary.append(entry)
    return summary


def results_table(task: EvalTask, summary: list[dict]) -> Table:
    from kvreviver_core.metrics import ROUGE_LABELS, ROUGE_TYPES

    with_reference = task.dataset.has_references
    splits = {tuple(entry["split"]) for entry in summary if entry["split"]}
    title = f"{task.dataset.name}: {len(task.prompts)} prompts, {task.settings.max_new_tokens} new tokens" + "".join(
        f", kvreviver V/C/R {'/'.join(f'{s:g}' for s in split)}" for split in sorted(splits))
    notes = [FIDELITY_NOTE, MEMORY_NOTE] if with_reference else [NO_REFERENCE_NOTE, FIDELITY_NOTE, MEMORY_NOTE]
    table = Table(title=title, caption=" ".join(notes))
    table.add_column("method")
    table.add_column("budget", justify="right")
    if with_reference:
        for name in ROUGE_TYPES:
            table.add_column(f"{ROUGE_LABELS[name]} (ref)", justify="right")
    table.add_column("ROUGE-L vs full", justify="right")
    table.add_column("1st token = full", justify="right")
    table.add_column("KV mem % of full", justify="right")
    table.add_column("tok/s", justify="right")
    for entry in summary:
        cells = [entry["method"], "-" if entry["budget"] is None else f"{entry['budget']:g}"]
        if with_reference:
            cells += [f"{100 * entry['reference_rouge'][n]:.1f}" if "reference_rouge" in entry else "-" for n in ROUGE_TYPES]
        cells += [f"{100 * entry['rougeL_vs_full']:.1f}", f"{100 * entry['first_token_match']:.0f}%",
                  f"{100 * entry['memory_fraction']:.1f}", f"{entry['tokens_per_second']:.1f}"]
        table.add_row(*cells)
    return table


def print_table(table: Table) -> None:
    # Piped or logged output has no terminal width to respect: print the table whole rather than squeezed to 80.
    if console.is_terminal:
        console.print(table)
    else:
        Console(file=console.file, width=max(console.width, 140)).print(table)


def check_out(out: Path | None) -> None:
    """``--out`` is usable: a folder or nothing yet, and given under torchrun (the ranks share rows through it)."""
    check_out_path(out)
    if out is None and distributed.RankInfo.from_env().distributed:
        raise UsageError("under torchrun, --out is needed: the ranks share their rows through its files")


def open_store(out: Path | None) -> ResultStore:
    """The results of ``--out`` (kept in memory only without it). Under torchrun, open it after
    :func:`run_sharded`: rank 0 then finds every rank's rows."""
    if out is None:
        return ResultStore(None, ROW_KEY)
    distributed.fold_rank_files(out / "results.jsonl", ROW_KEY)  # a killed torchrun run's rows count as done
    return ResultStore(out / "results.jsonl", ROW_KEY)


def parse_budgets(text: str, split) -> list[float]:
    budgets = parse_floats(text, "--budget")
    if not budgets:
        raise UsageError("--budget needs at least one fraction, e.g. 0.25 or 0.1,0.25")
    for budget in budgets:
        Budget(budget, split=split)  # its ValueError says what is wrong
    return budgets


def parse_split(text: str) -> tuple[float, float, float]:
    parts = parse_floats(text, "--split")
    return Budget(0.1, split=tuple(parts)).split  # validates: 3 parts, >= 0, summing to 1


def check_method_names(names: list[str]) -> None:
    """Each must be a method spec: a registered name, with options it has."""
    for name in names:
        try:
            _method_spec(name)
        except ValueError as error:
            raise UsageError(str(error)) from None


# The task's flags, shared by `eval` and `sweep-ratios`.
MODEL = typer.Option(None, help="HF hub id or local folder; default: the embedded SmolLM2-135M-Instruct.")
DTYPE = typer.Option("auto", help="auto, float32, bfloat16 or float16.")
DEVICE = typer.Option("auto", help="auto, cpu or cuda.")
DEVICE_MAP = typer.Option(None, help=DEVICE_MAP_HELP)
DATASET = typer.Option("builtin", help="builtin, xsum, cnn_dailymail or a FILE.jsonl.")
INPUT_FIELD = typer.Option("document", help="JSONL field holding the document.")
REFERENCE_FIELD = typer.Option("summary", help="JSONL field holding the reference summary.")
LIMIT = typer.Option(4, help="Number of documents (a seeded shuffle picks them); 0: all.")
BATCH_SIZE = typer.Option(4, help="Prompts decoded together.")
MAX_NEW_TOKENS = typer.Option(32, help="Tokens generated per prompt (greedy).")
MAX_CONTEXT = typer.Option(1024, help="Prompt length cap in tokens; the document is truncated, the instruction kept.")
SEED = typer.Option(0, help="Seed of the document shuffle.")
CONFIG = typer.Option(None, help="TOML file with the same keys as these flags; flags win.")


@clean_errors
def eval_command(
    ctx: typer.Context,
    model: Optional[str] = MODEL,
    dtype: str = DTYPE,
    device: str = DEVICE,
    device_map: Optional[str] = DEVICE_MAP,
    methods: Optional[str] = typer.Option(None, help="Comma-separated names or specs (kvreviver:combine=mean); default: every method that can run here (full always runs)."),
    budget: str = typer.Option("0.25", help="Fractions of the full cache's memory, comma-separated: 0.1,0.25."),
    split: str = typer.Option("0.1,0.45,0.45", help="KVReviver's Vague,Candidate,Recent shares (sum 1)."),
    dataset: str = DATASET,
    input_field: str = INPUT_FIELD,
    reference_field: str = REFERENCE_FIELD,
    limit: int = LIMIT,
    batch_size: int = BATCH_SIZE,
    max_new_tokens: int = MAX_NEW_TOKENS,
    max_context: int = MAX_CONTEXT,
    seed: int = SEED,
    out: Optional[Path] = typer.Option(None, help="Folder for results.jsonl and summary.json; a rerun resumes."),
    config: Optional[Path] = CONFIG,
) -> None:
    values = apply_config(ctx, config, {k: v for k, v in locals().items() if k not in ("ctx", "config")}, "eval")
    split_parts = parse_split(values["split"])
    budgets = parse_budgets(values["budget"], split_parts)
    requested = parse_names(values["methods"]) if values["methods"] is not None else None
    if requested is not None:
        if not requested:
            raise UsageError("--methods is empty; name at least one method")
        check_method_names(requested)
    settings = settings_from(values)
    check_out(values["out"])
    task = load_task(settings)
    usable = usable_methods(task, requested, budgets, split_parts)
    runs = runs_for(usable, budgets, split_parts)
    optional = set() if requested is not None else set(usable) - {FULL}
    run_sharded(task, runs, values["out"], optional)
    store = open_store(values["out"])
    runs = run_task(task, runs, store, optional)
    summary = summarize(task, runs, store)
    print_table(results_table(task, summary))
    if values["out"] is not None:
        write_summary(values["out"] / "summary.json", task, summary)
        console.print(f"results: {values['out'] / 'results.jsonl'}, summary: {values['out'] / 'summary.json'}")


def settings_from(values: dict) -> EvalSettings:
    """The task settings among a command's merged flag values (``--limit 0`` means every document)."""
    check_device_map(values["device"], values["device_map"])
    fields = ("model", "dtype", "device", "device_map", "dataset", "input_field", "reference_field", "max_context",
              "max_new_tokens", "seed", "batch_size")
    if values["limit"] < 0:
        raise UsageError(f"--limit must be 0 (all) or a positive number, got {values['limit']}")
    return EvalSettings(limit=values["limit"] or None, **{name: values[name] for name in fields})


def write_summary(path: Path, task: EvalTask, summary: list[dict]) -> None:
    document = {"settings": task.fingerprint(), "prompts": [p.id for p in task.prompts],
                "has_references": task.dataset.has_references, "note": FIDELITY_NOTE, "runs": summary}
    path.write_text(json.dumps(document, indent=2) + "\n")
