"""Benchmark 2 of issue 7: end-to-end decode tokens/s of ``kvreviver profile``, kvreviver divided by full.

Runs ``kvreviver profile`` (real model forward, manual prefill + greedy decode loop, NVML memory) in this process
on the Llama-2-7B architecture with random weights, once per context, and prints decode tok/s of each method and
the ratio kvreviver / full for every batch, side by side from the same run. KVReviver decodes through the fused
Triton kernel on CUDA (its default ``fused="auto"``). Runs that do not fit are "OOM" rows.

The full cache's attention is SDPA; ``--sdpa-backends`` (default flash, efficient, math) keeps cuDNN's backend out,
because on torch 2.11 / H200 it was seen building a new plan for each new key length, i.e. at every decode step
(see ``bench_decode_attention.py``'s ``step_full_default_sdpa_us``), which would slow the baseline unfairly.

``--modes eager,graphs`` runs ``profile`` twice per context, the second time with ``--cuda-graphs`` (decode steps
replayed from CUDA graphs; the full cache in its static layout). ``--compile`` compiles the model's decoder layers
for every method (``kvreviver_core/compiled.py``). Each context's rows are in
``--out/<mode>/ctx<N>/profile.jsonl`` (``profile`` resumes from them after a kill) and a
summary in ``--out/decode_e2e.json``.

Usage: python benchmarks/bench_decode_e2e.py [--contexts 8192,32768] [--batches 1,4,16] [--new-tokens 32]
       [--budget 0.1] [--methods full,kvreviver,kvreviver:combine=mean] [--modes eager,graphs] [--compile]
       [--out runs/decode_e2e] [--batches-32768 1,4] [--sdpa-backends flash,efficient,math]
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.nn.attention import SDPBackend, sdpa_kernel

from kvreviver_cli.app import app
from cli_args import BenchmarkParser, int_list

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}


def profile(context: int, batches: list[int], mode: str, args, out: Path) -> dict:
    command = ["profile", "--arch", args.arch, "--random-weights", "--methods", args.methods,
               "--budget", str(args.budget), "--batch", ",".join(map(str, batches)), "--context", str(context),
               "--new-tokens", str(args.new_tokens), "--decode-warmup", str(args.decode_warmup), "--out", str(out)]
    if mode == "graphs":
        command.append("--cuda-graphs")
    if args.compile:
        command.append("--compile")
    print(f"$ kvreviver {' '.join(command)}   (SDPA backends: {args.sdpa_backends})", flush=True)
    with sdpa_kernel([BACKENDS[name] for name in args.sdpa_backends.split(",")]):
        app(command, standalone_mode=False)
    return json.loads((out / "profile.json").read_text())


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama-2-7b")
    parser.add_argument("--contexts", type=int_list, default="8192,32768")
    parser.add_argument("--batches", type=int_list, default="1,4,16", help="batch sizes for every context")
    parser.add_argument("--batches-32768", dest="batches_32k", type=int_list, default=None,
                        help="batch sizes for the 32k context only (its prefill at batch 16 needs more memory)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--decode-warmup", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--methods", default="full,kvreviver",
                        help="methods or specs (kvreviver:combine=mean), full first: each is divided by full")
    parser.add_argument("--sdpa-backends", default="flash,efficient,math", help=", ".join(BACKENDS))
    parser.add_argument("--modes", default="eager", help="eager, graphs (profile --cuda-graphs) or eager,graphs")
    parser.add_argument("--compile", action="store_true", help="profile --compile: the model's decoder layers compiled")
    parser.add_argument("--out", type=Path, default=Path("runs/decode_e2e"))
    args = parser.parse_args()

    summary = []
    for context in args.contexts:
        batches = args.batches_32k if context == 32768 and args.batches_32k else args.batches
        for mode in args.modes.split(","):
            report = profile(context, batches, mode, args, args.out / mode / f"ctx{context}")
            rows = {(r["method"], r["batch"]): r for r in report["rows"]}
            speed = lambda r: r["decode_tokens_per_s"] if r and r["status"] == "ok" else None  # noqa: E731
            for batch in sorted({r["batch"] for r in report["rows"]}):
                full = rows.get(("full", batch))
                for method in (m for m in args.methods.split(",") if m != "full"):
                    rev = rows.get((method, batch))
                    ratio = speed(rev) / speed(full) if speed(rev) and speed(full) else None
                    summary.append({"device": report["setup"]["device"], "context": context, "mode": mode,
                                    "batch": batch, "method": method, "full_tok_s": speed(full),
                                    "method_tok_s": speed(rev), "ratio": ratio, "full_status": full and full["status"],
                                    "method_status": rev and rev["status"]})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_e2e.json").write_text(json.dumps(summary, indent=2))

    show = lambda x, fmt: "OOM" if x is None else format(x, fmt)  # noqa: E731
    print(f"\n{summary[0]['device'] if summary else ''}: decode tok/s, {args.arch} random weights, bf16, "
          f"{'decoder layers compiled, ' if args.compile else ''}"
          f"budget {args.budget:g}, {args.new_tokens} new tokens ({args.decode_warmup} untimed)")
    print("| context | mode | batch | method | full tok/s | method tok/s | method / full |")
    print("|---:|---|---:|---|---:|---:|---:|")
    for s in summary:
        ratio = "n/a (full OOM)" if s["ratio"] is None and s["method_tok_s"] else show(s["ratio"], ".2f")
        print(f"| {s['context']} | {s['mode']} | {s['batch']} | {s['method']} | {show(s['full_tok_s'], '.1f')} | "
              f"{show(s['method_tok_s'], '.1f')} | {ratio} |")


if __name__ == "__main__":
    main()
