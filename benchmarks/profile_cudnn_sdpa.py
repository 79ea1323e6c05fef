"""Is the full cache's slow decode in ``kvreviver profile`` cuDNN attention planning each new sequence length?

Every decode step attends over one more token, so SDPA sees a new key length at each step. This script times the
``full`` cache's decode (``measure_run``, batch 1) over key lengths the process has not seen, then over the same
lengths again, then over new lengths with cuDNN's SDPA backend switched off, then over new lengths with it on.

Run on a GPU machine: ``python benchmarks/profile_cudnn_sdpa.py --arch llama-2-7b``.
"""

from __future__ import annotations


import torch

from kvreviver_core.models import load_model
from kvreviver_core.profiling import RunSpec, measure_run, release_memory
from cli_args import BenchmarkParser


def main() -> None:
    parser = BenchmarkParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama-2-7b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    model, _ = load_model(None, "auto", "cuda", arch=args.arch, random_weights=True)
    release_memory(next(model.parameters()).device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.arch}, batch {args.batch}")
    cases = [("cuDNN SDPA on, new key lengths", 2048, True), ("cuDNN SDPA on, same lengths again", 2048, True),
             ("cuDNN SDPA off, new key lengths", 2304, False), ("cuDNN SDPA on, new key lengths", 2560, True)]
    for label, context, cudnn in cases:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        spec = RunSpec("full", 1.0, context, args.steps + 4, decode_warmup=4)
        row = measure_run(model, spec, args.batch)
        ms = 1000 * row.decode_s / row.decode_steps_timed
        print(f"context {context}  {label:36s} {ms:7.2f} ms/step  {row.decode_tokens_per_s:7.1f} tok/s")


if __name__ == "__main__":
    main()
