"""Benchmark 2 of issue 7 (and optionally benchmark 1) for several git revisions, side by side in one device call.

Two steps, because the GPU machine gets a copy of the working tree without git:

* here: ``python benchmarks/ab_revisions.py prepare main exp/some-branch ...`` writes each (committed) revision's
  ``kvreviver_core``, ``kvreviver_cli`` and ``benchmarks`` (a ``git archive``) under ``runs/ab/<name>/`` and the
  list of revisions, with their commits, to ``runs/ab/revisions.json``;
* on the GPU machine, with ``runs/ab`` carried: ``python benchmarks/ab_revisions.py run [--contexts 32768,8192]
  [--rounds 2] [--attention] [--timeline] [--out DIR]``.

``run`` decodes at batch 1, graphed, with the model's decoder layers compiled (``bench_decode_e2e.py --modes graphs
--compile --batches 1``, Llama-2-7B architecture with random weights, budget 0.1): the full cache once a round and
context, in the first revision's tree, then KVReviver (``combine="mean"``) in each revision's tree, each in a process
of its own with that tree on ``PYTHONPATH``. ``--rounds`` repeats the whole in turn (A B A B), so that a drift of the
device shows as such. It prints each revision's tok/s and its ratio to the full cache of the same round, and writes
them to ``DIR/ab.json``. With ``--attention``, also benchmark 1 per revision (``bench_decode_attention.py
--combines mean`` at the first context, ``--attention-grid`` as its ``--grid``: every configuration's time, the
defaults first). With ``--timeline``, each revision's layer step on the timeline at the first context
(``profile_decode_e2e.py --trace``, then the revision's own ``trace_layer_timeline.py``).
A rerun skips the benchmarks that are done (their rows stay under ``DIR/<name>/``); the timeline runs again.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from cli_args import BenchmarkParser, int_list

TREES = ("kvreviver_core", "kvreviver_cli", "benchmarks")
AB = Path("runs/ab")
MANIFEST = AB / "revisions.json"
E2E = ["--modes", "graphs", "--compile", "--batches", "1"]
METHOD = "kvreviver:combine=mean"


def fail(message: str) -> None:
    print(f"ab_revisions: {message}", file=sys.stderr)
    raise SystemExit(2)


def tree_name(revision: str) -> str:
    """A directory name for a revision: ``exp/a-b`` becomes ``exp__a-b``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", revision.replace("/", "__"))


def prepare(revisions: list[str]) -> list[dict]:
    listed = []
    for revision in revisions:
        found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
                               capture_output=True, text=True)
        if found.returncode != 0:
            fail(f"{revision!r} is not a revision of this repository")
        listed.append({"revision": revision, "commit": found.stdout.strip(), "name": tree_name(revision)})
    if len({r["name"] for r in listed}) < len(listed):
        fail("two revisions share a directory name: list each revision once")
    for entry in listed:
        archive = subprocess.run(["git", "archive", "--format=tar", entry["commit"], *TREES], capture_output=True)
        if archive.returncode != 0:
            fail(f"git archive {entry['revision']}: {archive.stderr.decode().strip().splitlines()[-1]}")
        target = AB / entry["name"]
        shutil.rmtree(target, ignore_errors=True)  # nothing left over from an earlier prepare of another commit
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(target, filter="data")
        print(f"{entry['revision']} ({entry['commit'][:7]}) -> {target}")
    AB.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(json.dumps(listed, indent=1))
    return listed


def read_manifest() -> list[dict]:
    try:
        listed = json.loads(MANIFEST.read_text())
        missing = [r["name"] for r in listed if not (AB / r["name"] / "benchmarks").is_dir()]
    except (OSError, ValueError, KeyError, TypeError) as error:
        fail(f"cannot read {MANIFEST} ({error}): run 'prepare' first, and carry runs/ab")
    if missing or not listed:
        fail(f"{MANIFEST} lists trees that are not under {AB}: {', '.join(missing) or 'none listed'}")
    return listed


def in_tree(tree: Path, script: str, arguments: list[str]) -> None:
    """Run one benchmark script of ``tree`` with that tree first on the path (its code, not the working tree's)."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    done = subprocess.run([sys.executable, f"benchmarks/{script}", *arguments], cwd=tree, env=env)
    if done.returncode != 0:
        fail(f"{script} in {tree} exited with {done.returncode} (its output is above; what ran before is kept)")


def decode_speed(out: Path, context: int, method: str) -> tuple[float | None, str]:
    """Decode tok/s of ``method`` at batch 1 in a ``bench_decode_e2e.py`` run (None where it did not run through)
    and its status, from the run's ``profile.json``."""
    report = json.loads((out / "graphs" / f"ctx{context}" / "profile.json").read_text())
    row = next(r for r in report["rows"] if r["method"] == method and r["batch"] == 1)
    return (row["decode_tokens_per_s"] if row["status"] == "ok" else None), row["status"]


def summarize(rows: list[dict]) -> str:
    """A Markdown table of ``run``'s rows: per round and context, the full cache and each revision's ratio to it."""
    lines = ["| context | round | revision | commit | tok/s | / full (same round) |", "|---:|---:|---|---|---:|---:|"]
    full = {(r["context"], r["round"]): r["tok_s"] for r in rows if r["revision"] is None}
    for r in rows:
        base = full.get((r["context"], r["round"]))
        tok_s = f"{r['tok_s']:.1f}" if r["tok_s"] else r["status"]
        if r["revision"] is None:
            lines.append(f"| {r['context']} | {r['round']} | full cache | | {tok_s} | |")
        else:
            ratio = f"{r['tok_s'] / base:.3f}" if base and r["tok_s"] else "n/a"
            lines.append(f"| {r['context']} | {r['round']} | {r['revision']} | {r['commit'][:7]} | {tok_s} | "
                         f"{ratio} |")
    return "\n".join(lines)


def attention_lines(attention: list[dict]) -> list[str]:
    """Benchmark 1's configurations per revision, the defaults first, with their knobs' names once a revision."""
    lines = []
    for a in attention:
        lines.append(f"attention at {a['context']}, {a['revision']} ({a['commit'][:7]}), SDPA over the full cache "
                     f"{a['sdpa_full_us']:.1f} us; {a['knobs']}:")
        lines += [f"  {config}: {us:.1f} us{' (defaults)' if i == 0 else ''}"
                  for i, (config, us) in enumerate(a["sweep_us"].items())]
    return lines


def run(args, contexts: list[int]) -> None:
    listed = read_manifest()
    import torch

    if not torch.cuda.is_available():
        fail("'run' needs a CUDA GPU (and Triton): run it on the GPU machine")
    out = args.out.resolve()
    rows = []
    for round_ in range(1, args.rounds + 1):
        for context in contexts:
            common = [*E2E, "--contexts", str(context), "--new-tokens", str(args.new_tokens)]
            full_out = out / "full" / f"round{round_}_ctx{context}"
            in_tree(AB / listed[0]["name"], "bench_decode_e2e.py", [*common, "--methods", "full", "--out", str(full_out)])
            tok_s, status = decode_speed(full_out, context, "full")
            rows.append({"context": context, "round": round_, "revision": None, "commit": "", "tok_s": tok_s,
                         "status": status})
            print(f"ab_revisions: {context}, round {round_}, full cache: {tok_s or status} tok/s", flush=True)
            for entry in listed:
                method_out = out / entry["name"] / f"round{round_}_ctx{context}"
                in_tree(AB / entry["name"], "bench_decode_e2e.py",
                        [*common, "--methods", METHOD, "--out", str(method_out)])
                tok_s, status = decode_speed(method_out, context, METHOD)
                rows.append({"context": context, "round": round_, "revision": entry["revision"],
                             "commit": entry["commit"], "tok_s": tok_s, "status": status})
                print(f"ab_revisions: {context}, round {round_}, {entry['revision']}: {tok_s or status} tok/s",
                      flush=True)
    attention = []
    if args.attention:
        for entry in listed:
            path = out / entry["name"] / "attention.jsonl"
            in_tree(AB / entry["name"], "bench_decode_attention.py",
                    ["--contexts", str(contexts[0]), "--combines", "mean", "--grid", args.attention_grid,
                     "--out", str(path)])
            row = json.loads(path.read_text().splitlines()[0])
            attention.append({"revision": entry["revision"], "commit": entry["commit"], "context": contexts[0],
                              "knobs": row["kernel_knobs"], "sweep_us": row["sweep_us"],
                              "sdpa_full_us": row["sdpa_full_us"]})
    if args.timeline:
        for entry in listed:
            traces = out / entry["name"] / "trace"
            in_tree(AB / entry["name"], "profile_decode_e2e.py",
                    ["--contexts", str(contexts[0]), "--modes", "graphs", "--blocks", "compiled", "--methods", METHOD,
                     "--profiled", "9", "--trace", str(traces), "--out", str(out / entry["name"] / "profile.jsonl")])
            print(f"timeline at {contexts[0]}, {entry['revision']} ({entry['commit'][:7]}):", flush=True)
            trace = sorted(traces.glob(f"*_{contexts[0]}_graphs.json.gz"))  # the one method profiled
            if not trace:
                fail(f"profile_decode_e2e.py wrote no trace under {traces}")
            in_tree(AB / entry["name"], "trace_layer_timeline.py", [str(trace[0])])
    (out / "ab.json").write_text(json.dumps({"e2e": rows, "attention": attention}, indent=1))
    print(summarize(rows))
    print("\n".join(attention_lines(attention)))


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ready = commands.add_parser("prepare", help="archive revisions under runs/ab (here, in the git checkout)")
    ready.add_argument("revisions", nargs="+")
    timed = commands.add_parser("run", help="time the prepared revisions (on the GPU machine)")
    timed.add_argument("--contexts", type=int_list, default="32768,8192")
    timed.add_argument("--rounds", type=int, default=1)
    timed.add_argument("--new-tokens", type=int, default=24)
    timed.add_argument("--attention", action="store_true", help="also benchmark 1 at the first context")
    timed.add_argument("--attention-grid", default="NUM_WARPS=4",
                       help="bench_decode_attention's --grid (a knob every revision has, at its default)")
    timed.add_argument("--timeline", action="store_true",
                       help="also each revision's layer step on the timeline at the first context (a profiler trace)")
    timed.add_argument("--out", type=Path, default=Path("runs/ab_results"))
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.revisions)
    else:
        if args.rounds < 1:
            fail("--rounds must be at least 1")
        run(args, args.contexts)


if __name__ == "__main__":
    main()
