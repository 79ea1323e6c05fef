"""EchoKV fidelity on SmolLM2 (issue 8, item 3): how little each method changes what the model says, at one budget.

Prompts: builtin prose that calibration never read, laid out as ``kvreviver eval --dataset builtin`` lays it out
(SmolLM2's chat template, "Text: ...", "Summarize the above text in 2 sentences."). The held-out part of
``pydoc_data.topics`` alone makes only 4 passages of 1k tokens, so the passages also take the calibration part's
paragraphs beyond the tokens calibration reads (its first 4096); any paragraph that also occurs in what calibration
read is left out (pydoc sections quote each other). Each prompt runs alone (batch 1), greedy, through the real
``model.generate`` with each method's cache. The score is ROUGE-L F (rouge-score, Porter stemmer) of a method's text
against the full cache's text on the same prompt, averaged over prompts, with the share of prompts whose first
generated token matches. Memory is ``cache.memory_bytes() / cache.full_bytes()`` at the end of generation.

EchoKV's weights (and VECTOR's, when ``--methods`` names it) are calibrated first if ``--out`` has none
(``kvreviver calibrate --method echokv`` with its defaults, on the calibration part of the same prose; ``--weights``
points at other EchoKV weights). Rows go to
``OUT/rows.jsonl`` as they finish (a rerun skips them), the table to stdout and ``OUT/table.md``.

    python benchmarks/bench_echokv_fidelity.py --prompts 8 --budget 0.5 --out out/bench_echokv
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvreviver_core.calibration import CALIBRATION_TOKENS, builtin_prose, calibrate, calibration_ids
from kvreviver_core.data import (
    BUILTIN_INSTRUCTION, Example, Prompt, SummarizationSet, build_prompts, count_tokens, document_token_room,
)
from kvreviver_core.generation import generate_batch
from kvreviver_core.metrics import fidelity
from kvreviver_core.models import load_model
from kvreviver_core.results import ResultStore
from cli_args import BenchmarkParser

console = Console()


def parse_method(spec: str) -> tuple[str, str, dict]:
    """``name`` or ``name:key=value,key=value`` -> (label, method, options)."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = float(value) if value.replace(".", "", 1).isdigit() else value
    return spec, name, options


def main() -> None:
    parser = BenchmarkParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="echokv,kvreviver,h2o", help="comma-separated; name:key=value for options")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-context", type=int, default=1100, help="prompt tokens at most (chat template included)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--weights", type=Path, default=None,
                        help="EchoKV weights (default: OUT/echokv-smollm2.safetensors); vector's are OUT/vector-smollm2")
    parser.add_argument("--out", type=Path, default=Path("out/bench_echokv"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(None, dtype="float32", device="cpu")
    weights = {"echokv": args.weights or args.out / "echokv-smollm2.safetensors",
               "vector": args.out / "vector-smollm2.safetensors"}
    prompts = unseen_prompts(tokenizer, args.max_context)[: args.prompts]
    methods = [("full", "full", {})] + [parse_method(m) for m in args.methods.split(",") if m]
    for _, method, _ in methods:
        if method in weights and not weights[method].exists():
            console.print(f"calibrating {method} into {weights[method]} (kvreviver calibrate --method {method}, defaults)")
            calibrate(method, model, tokenizer, out=weights[method])
    store = ResultStore(args.out / "rows.jsonl", ("method", "prompt", "budget", "new_tokens"))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("generating", total=len(methods) * len(prompts))
        for label, method, options in methods:
            if method in weights:
                options = {"weights": str(weights[method]), **options}
            for prompt in prompts:
                key = dict(method=label, prompt=prompt.id, budget=args.budget, new_tokens=args.new_tokens)
                progress.update(task, description=f"{label} {prompt.id}")
                if not store.has(**key):
                    store.append({**key, **run(model, tokenizer, prompt, method, args, options)})
                progress.advance(task)
    table = render(store.rows, methods, prompts, args)
    (args.out / "table.md").write_text(table + "\n")
    console.print(table)


def unseen_prompts(tokenizer, max_context: int) -> list[Prompt]:
    """Passages (whole paragraphs, at most the document room of ``max_context``) of prose calibration never read."""
    calibration = builtin_prose("calibration")
    read = tokenizer.decode(calibration_ids(tokenizer, calibration, CALIBRATION_TOKENS).flatten())
    unread = calibration[len(read):]
    paragraphs = [p for p in (builtin_prose("heldout") + "\n\n" + unread).split("\n\n") if p.strip() and p not in read]
    room = document_token_room(tokenizer, BUILTIN_INSTRUCTION, "Text", max_context)
    passages, current, used = [], [], 0
    for paragraph in paragraphs:
        size = count_tokens(tokenizer, paragraph)
        if size > room:
            continue
        if current and used + size > room:
            passages.append(Example(f"unseen-{len(passages)}", "\n\n".join(current), None))
            current, used = [], 0
        current.append(paragraph)
        used += size
    dataset = SummarizationSet("unseen builtin", passages, BUILTIN_INSTRUCTION, "Text")
    return build_prompts(dataset, tokenizer, max_context)


def run(model, tokenizer, prompt, method: str, args, options: dict) -> dict:
    budget = 1.0 if method == "full" else args.budget
    started = time.perf_counter()
    try:
        [result] = generate_batch(model, tokenizer, [prompt.text], method, budget, args.new_tokens, **options)
    except ValueError as exc:  # e.g. a prompt too short to pay for EchoKV's weights at this budget
        return {"error": str(exc), "prompt_tokens": prompt.prompt_tokens}
    return {"text": result.text, "ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
            "memory_ratio": result.memory_bytes / result.full_bytes, "seconds": time.perf_counter() - started}


def render(rows: list[dict], methods, prompts, args) -> str:
    ids = {p.id for p in prompts}
    mine = [r for r in rows if r["prompt"] in ids and r["budget"] == args.budget and r["new_tokens"] == args.new_tokens]
    full = {r["prompt"]: r for r in mine if r["method"] == "full"}
    tokens = [r["prompt_tokens"] for r in full.values()]
    lines = [
        f"SmolLM2-135M-Instruct (fp32), budget {args.budget:g}, {len(prompts)} prompts of unseen builtin prose, "
        f"{min(tokens)}-{max(tokens)} tokens, {args.new_tokens} new tokens, greedy; device: CPU "
        f"({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
        "",
        "| method | ROUGE-L vs full (mean) | min | first token = full | memory / full | prompts scored |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, method, _ in methods:
        if method == "full":
            continue
        scored = [(r, full[r["prompt"]]) for r in mine if r["method"] == label and "text" in r and r["prompt"] in full]
        if not scored:
            lines.append(f"| {label} | - | - | - | - | 0 of {len(prompts)} |")
            continue
        fids = [fidelity(r["text"], r["ids"], f["text"], f["ids"]) for r, f in scored]
        rouge = [x.rouge_l_vs_full for x in fids]
        lines.append(
            f"| {label} | {100 * statistics.mean(rouge):.1f} | {100 * min(rouge):.1f} | "
            f"{sum(x.first_token_match for x in fids)}/{len(fids)} | "
            f"{statistics.mean(r['memory_ratio'] for r, _ in scored):.3f} | {len(scored)} of {len(prompts)} |"
        )
    errors = sorted({r["error"] for r in mine if "error" in r})
    lines += [""] + [f"not scored: {e}" for e in errors]
    return "\n".join(lines).rstrip()


if __name__ == "__main__":
    main()
