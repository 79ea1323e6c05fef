"""Benchmark 3 of issue 7: greedy generation with the fused Triton kernel gives the same tokens as with the reference.

Four prompts of different lengths (prose from ``pydoc_data``, left-padded in one batch) are decoded greedily for
``--new-tokens`` tokens (EOS suppressed, so every row has them all) through ``model.generate`` with a KVReviver
cache at ``--budget``, three times: with the Triton kernel (``fused=True``), with the pure-torch reference
(``fused="reference"``), and with the unfused revive path (``fused=False``) as a control. For each dtype and
estimator it reports how many prompts got identical tokens, and the first step where they differ.

The default model is the embedded SmolLM2-135M-Instruct; ``--arch NAME`` uses random weights of a preset instead
(no tokenizer: the prompts are then random token ids of the same lengths).

Usage: python benchmarks/bench_decode_equivalence.py [--dtypes float32,bfloat16] [--estimators sum,mean]
       [--combines median,mean] [--budget 0.1] [--new-tokens 64] [--arch smollm2-135m]
       [--out runs/decode_equivalence.json]
"""

from __future__ import annotations

import json
from pathlib import Path

import pydoc_data.topics
import torch

from kvreviver_core import models
from kvreviver_core.cache import make_cache
from kvreviver_core.generation import cache_kwargs, format_prompt
from cli_args import BenchmarkParser, require_cuda

PROMPT_TOKENS = (300, 650, 1000, 1500)
FUSED = {"kernel": True, "reference": "reference", "unfused": False}


def prompts(tokenizer, vocab: int, device) -> dict:
    """Left-padded ``input_ids``/``attention_mask`` for four prompts of about PROMPT_TOKENS tokens."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        rows = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_TOKENS]
    else:
        topics = sorted(pydoc_data.topics.topics.items(), key=lambda kv: -len(kv[1]))
        rows = []
        for (_, text), n in zip(topics, PROMPT_TOKENS):
            words = " ".join(text.split()[: int(n * 0.7)])
            rows.append(tokenizer(format_prompt(tokenizer, f"Summarize this text:\n\n{words}"),
                                  add_special_tokens=False)["input_ids"])
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def greedy(model, inputs, new_tokens: int, budget: float, **options) -> list[list[int]]:
    cache = make_cache("kvreviver", budget, model=model, **options)
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=0, **cache_kwargs(model, cache))
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF id or folder (default: the embedded SmolLM2)")
    parser.add_argument("--arch", default=None, help="random weights of this preset instead of a checkpoint")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--estimators", default="sum,mean")
    parser.add_argument("--combines", default="median", help="the sketch's row combines: median, mean or both")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/decode_equivalence.json"))
    args = parser.parse_args()
    require_cuda("it compares the Triton kernel with the reference")

    results = []
    for dtype in args.dtypes.split(","):
        model, tokenizer = models.load_model(args.model, dtype=dtype, device="cuda", arch=args.arch,
                                             random_weights=args.arch is not None)
        inputs = prompts(tokenizer, model.config.vocab_size, "cuda")
        for estimator, combine in ((e, c) for e in args.estimators.split(",") for c in args.combines.split(",")):
            tokens = {name: greedy(model, inputs, args.new_tokens, args.budget, fused=fused, estimator=estimator,
                                   combine=combine) for name, fused in FUSED.items()}
            for other in ("kernel", "unfused"):
                diffs = [first_difference(a, b) for a, b in zip(tokens[other], tokens["reference"])]
                row = {"model": args.arch or args.model or "SmolLM2-135M-Instruct", "dtype": dtype,
                       "estimator": estimator, "combine": combine, "budget": args.budget, "compare": f"{other} vs reference",
                       "prompt_tokens": inputs["attention_mask"].sum(1).tolist(), "new_tokens": args.new_tokens,
                       "identical": sum(d is None for d in diffs), "prompts": len(diffs), "first_difference": diffs,
                       "device": torch.cuda.get_device_name()}
                results.append(row)
                print(json.dumps(row), flush=True)
            if tokenizer is not None:
                print("kernel, prompt 0:", repr(tokenizer.decode(tokens["kernel"][0])), flush=True)
        del model
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("\n| model | dtype | estimator | combine | comparison | identical prompts | first differing step |")
    print("|---|---|---|---|---|---:|---|")
    for r in results:
        print(f"| {r['model']} | {r['dtype']} | {r['estimator']} | {r['combine']} | {r['compare']} | "
              f"{r['identical']}/{r['prompts']} | "
              f"{', '.join('-' if d is None else str(d) for d in r['first_difference'])} |")


if __name__ == "__main__":
    main()
