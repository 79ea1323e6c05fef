"""Time ``scored_attention``, the prefill attention of the methods that score tokens (KVReviver, H2O, ...).

It computes the exact output and the column sums of the softmax probabilities, chunked so that no chunk's logits
exceed ``CHUNK_ELEMENTS``. This times it on random inputs of the given shape, causal with no mask (an unpadded
prompt), and prints the best of ``--repeats`` runs. Run it at two commits to compare them side by side.

Usage: python benchmarks/bench_scored_prefill.py [--batch 2] [--heads 8] [--kv-heads 4] [--tokens 1536]
       [--head-dim 64] [--dtype float32] [--device cpu] [--repeats 5]
"""

from __future__ import annotations

import json
import time

import torch

from kvreviver_core.attention import scored_attention
from cli_args import BenchmarkParser


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1536)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    shape = lambda heads: (args.batch, heads, args.tokens, args.head_dim)  # noqa: E731
    query = torch.randn(shape(args.heads), generator=gen).to(device, dtype)
    key, value = (torch.randn(shape(args.kv_heads), generator=gen).to(device, dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(args.repeats + 1):  # the first run warms up
        sync()
        start = time.perf_counter()
        scored_attention(query, key, value, None, args.head_dim ** -0.5, None)
        sync()
        times.append(time.perf_counter() - start)
    print(json.dumps({**vars(args), "best_s": min(times[1:]), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
