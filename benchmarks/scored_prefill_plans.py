"""Shared memory each pass of the scored prefill (``kvreviver_core.kernels.scored_prefill``) needs, on any machine,
without a GPU: each kernel compiled with Triton's own ptxas for sm_90 (H100/H200, 227 KiB a block at most) and sm_80
(A100, 163 KiB), with its own plan and with ``FALLBACK_PLAN``, for a few head dims and dtypes; each figure is the
larger of the two builds, with and without a mask. A plan past the GPU's limit is one Triton refuses to load; the
pass then takes the fallback plan.

Usage: python benchmarks/scored_prefill_plans.py [--head-dims 64,128,256] [--dtypes bf16,fp32] [--archs 90,80]
"""

from __future__ import annotations

from cli_args import BenchmarkParser, int_list, require_triton

require_triton()  # before the imports below, which need it

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kvreviver_core.kernels import scored_prefill  # noqa: E402

SHARED_KIB = {90: 227, 80: 163}  # the most shared memory one block may take: H100/H200, A100
POINTERS = {"Q": "*{dtype}", "K": "*{dtype}", "V": "*{dtype}", "OUT": "*{dtype}", "LSE": "*fp32", "SCORES": "*fp32",
            "MASK": "*u8"}
KERNELS = {"rows": "_attend_rows", "mass": "_column_mass"}


def own_plan(kernel: str) -> tuple[int, int, int, int]:
    prefix = {"rows": "ROW", "mass": "MASS"}[kernel]
    return tuple(getattr(scored_prefill, f"{prefix}_{part}") for part in ("BLOCK_M", "BLOCK_N", "WARPS", "STAGES"))


def shared_kib(kernel: str, plan, arch: int, head_dim: int, dtype: str) -> float:
    """KiB of shared memory ``kernel`` ("rows" or "mass") compiles to under ``plan`` (queries, keys, warps, stages):
    the larger of its builds with and without a mask."""
    function = getattr(scored_prefill, KERNELS[kernel])
    block_m, block_n, warps, stages = plan
    used = []
    for has_mask in (False, True):
        constexprs = dict(G=1, HAS_MASK=has_mask, D=head_dim, DP=triton.next_power_of_2(head_dim), BLOCK_M=block_m,
                          BLOCK_N=block_n, IEEE=dtype == "fp32")
        types = {name: "constexpr" if name in constexprs else
                 POINTERS[name].format(dtype=dtype) if name in POINTERS else "fp32" if name == "scaling" else "i32"
                 for name in function.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(function.arg_names) if name in POINTERS}
        compiled = triton.compile(ASTSource(function, types, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        used.append(compiled.metadata.shared / 1024)
    return max(used)


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dims", type=int_list, default="64,128,256")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--archs", type=int_list, default="90,80")
    args = parser.parse_args()
    unknown = [a for a in args.archs if a not in SHARED_KIB] + [d for d in args.dtypes.split(",") if d not in
                                                                ("bf16", "fp16", "fp32")]
    if unknown:
        parser.error(f"unknown arch or dtype {unknown[0]!r} (archs 90, 80; dtypes bf16, fp16, fp32)")
    print("| arch | head_dim | dtype | pass | own plan KiB | fallback KiB | limit KiB |")
    print("|---:|---:|---|---|---:|---:|---:|")
    for arch in args.archs:
        for head_dim in args.head_dims:
            for dtype in args.dtypes.split(","):
                for kernel in KERNELS:
                    own = shared_kib(kernel, own_plan(kernel), arch, head_dim, dtype)
                    fallback = shared_kib(kernel, scored_prefill.FALLBACK_PLAN, arch, head_dim, dtype)
                    print(f"| sm_{arch} | {head_dim} | {dtype} | {kernel} | {own:.0f} | {fallback:.0f} | "
                          f"{SHARED_KIB[arch]} |", flush=True)


if __name__ == "__main__":
    main()
