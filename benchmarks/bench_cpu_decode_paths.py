"""Why ``fused="auto"`` keeps the unfused decode path off CUDA: the two CPU paths side by side (issue 7).

On the embedded SmolLM2-135M-Instruct, on the CPU: one prompt of pydoc prose, KVReviver at ``--budget``, greedy
decoding through the model's forward, once with ``fused=False`` (revive the layer's K/V from the sketch, then exact
attention: the paper's Algorithm 4) and once with ``fused="reference"`` (the pure-torch reference of the Triton
kernel, which reconstructs the Vague tokens chunk by chunk and hashes them twice, once for keys and once for
values). Prints decode tokens/s of each, alternating ``--repeats`` times, and whether the greedy tokens agree.

Usage: python benchmarks/bench_cpu_decode_paths.py [--dtype float32] [--prompt-tokens 1500] [--new-tokens 32]
"""

from __future__ import annotations

import time

import pydoc_data.topics
import torch

from kvreviver_core import models
from kvreviver_core.cache import make_cache
from kvreviver_core.generation import cache_kwargs
from kvreviver_core.generation import greedy_next
from cli_args import BenchmarkParser

PATHS = {"unfused (auto on CPU)": False, "reference": "reference"}


@torch.no_grad()
def decode(model, ids, fused, budget: float, new_tokens: int) -> tuple[float, list[int]]:
    cache = make_cache("kvreviver", budget, model=model, fused=fused)
    forward = cache_kwargs(model, cache)
    token = greedy_next(model, ids, forward, logits_to_keep=1)
    tokens = []
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = greedy_next(model, token, forward)
        tokens.append(int(token))
    return new_tokens / (time.perf_counter() - start), tokens


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model, tokenizer = models.load_model(None, dtype=args.dtype, device="cpu")
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.prompt_tokens]
    speeds: dict[str, list[float]] = {name: [] for name in PATHS}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for name, fused in PATHS.items():
            speed, tokens[name] = decode(model, ids, fused, args.budget, args.new_tokens)
            speeds[name].append(speed)
    print(f"CPU ({torch.get_num_threads()} threads), SmolLM2-135M-Instruct {args.dtype}, prompt {ids.shape[1]} tokens, "
          f"budget {args.budget:g}, {args.new_tokens} new tokens, {args.repeats} alternating runs")
    for name in PATHS:
        print(f"  {name}: decode tok/s {', '.join(f'{s:.1f}' for s in speeds[name])}")
    first, second = tokens.values()
    same = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), None)
    print("  greedy tokens: " + ("identical" if same is None else f"first differ at step {same}"))


if __name__ == "__main__":
    main()
