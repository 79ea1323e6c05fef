"""Tensor ops that one KVReviver decode step issues besides attention, counted on the CPU (issue 7).

A decode step on the GPU is host-bound (``profile_decode_e2e.py``): its time follows the number of ops the layer's
bookkeeping issues (update, cumulative scores, hand-over, fold, swap test and swap), each a kernel launch on CUDA.
This counts them without a GPU, on the torch path. On CUDA with the Triton decode kernel, every step is three
Triton launches and the length's increment instead, with no host read (``kernels/inplace_step.py``: append, the
kernel's split-K pass, and its combine with Algorithm 3); the torch path still runs on the CPU, with ``fused="reference"`` or ``False``. A ``ReviverLayer`` on the CPU gets
a random prefill and random cumulative scores, then decode steps of random q/k/v through the registered attention
function, with the decode attention itself (the reference here, the Triton kernel on CUDA) left out of the count;
the key-validity mask built for it counts.
Views and empty allocations are not counted. Every ``--force-swap-every`` steps, one Vague position gets a large
attention mass, so that step swaps.

Prints the ops of each step; steady steps, fold steps (every ``recent_slack + 1``) and swap steps differ.

Usage: python benchmarks/count_decode_ops.py [--steps 18] [--estimator sum]
"""

from __future__ import annotations

import collections
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvreviver_core import attention
from kvreviver_core.budget import Budget
from kvreviver_core.methods.reviver import ReviverLayer
from cli_args import BenchmarkParser

NOT_COUNTED = {"view", "as_strided", "expand", "unsqueeze", "reshape", "slice", "select", "_reshape_alias", "t",
               "transpose", "unbind", "squeeze", "alias", "detach", "_unsafe_view", "permute", "split", "narrow",
               "split_with_sizes", "empty", "empty_strided", "lift_fresh"}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counting = True
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if self.counting and name not in NOT_COUNTED:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimator", default="sum")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--force-swap-every", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    h, d, n = args.heads, args.head_dim, args.context
    layer = ReviverLayer(0, Budget(args.budget), estimator=args.estimator, fused="reference")
    layer.update(torch.randn(1, h, n, d), torch.randn(1, h, n, d))
    layer.observe(torch.rand(1, h, n), torch.ones(1, n, dtype=torch.bool))
    counter = OpCounter()

    def uncounted(decode, force_swap: bool):
        """The step's decode attention (the kernel's on a GPU) out of the count, the layer's own code in it."""
        def attend(*inputs):
            counter.counting = False
            out, mass = decode(*inputs)
            if force_swap:
                vague = (~layer.exact_map() & layer.valid_positions())[0, 0].nonzero()
                mass[:, :, int(vague[0])] += 100.0
            counter.counting = True
            return out, mass
        return attend

    module = types.SimpleNamespace(layer_idx=0)
    per_step = []
    with counter:
        for step_index in range(args.steps):
            counter.counting = False
            q, k, v = (torch.randn(1, h, 1, d) for _ in range(3))
            counter.counting = True
            before = sum(counter.ops.values())
            keys, values = layer.update(k, v)
            layer._decode = uncounted(layer._decode, step_index % args.force_swap_every == args.force_swap_every - 1)
            attention.announce_layer(0, layer)
            attention.kvreviver_attention(module, q, keys, values, None, d**-0.5)
            per_step.append(sum(counter.ops.values()) - before)
    print(f"ops per decode step ({args.estimator}, fold every {layer.budget.recent_slack + 1} steps, a forced swap "
          f"every {args.force_swap_every}): {per_step}")
    print(f"mean {sum(per_step) / len(per_step):.1f}; most issued: "
          + ", ".join(f"{name} {count / len(per_step):.1f}" for name, count in counter.ops.most_common(8)))


if __name__ == "__main__":
    main()
