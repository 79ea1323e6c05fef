"""Shared memory each pass of the scored prefill (``kvreviver_core.kernels.scored_prefill``) needs, on any machine,
without a GPU: each kernel compiled with Triton's own ptxas for sm_90 (H100/H200, 227 KiB a block at most) and sm_80
(A100, 163 KiB), with its own plan (built without and with a mask: a padded batch takes the second) and with
``FALLBACK_PLAN`` (the larger of its two builds), for a few head dims and dtypes. A plan past the GPU's limit is one
Triton refuses to load; the pass then takes the fallback plan.

With ``--sass``, instead: what each pass's own plan compiles to, without a mask: registers a thread, stack (spills
to local memory show as ``STL``) and each loop's instruction mix, as ``sass_decode_kernels.py`` prints them for the
decode kernel. The plans are module constants, so ``with_knobs.py kernels.scored_prefill.MASS_WARPS=8
scored_prefill_plans.py --sass`` checks another one before device time is spent on it.

Usage: python benchmarks/scored_prefill_plans.py [--head-dims 64,128,256] [--dtypes bf16,fp32] [--archs 90,80]
       [--sass]
"""

from __future__ import annotations

from cli_args import BenchmarkParser, int_list, require_triton

require_triton()  # before the imports below, which need it

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kvreviver_core.kernels import scored_prefill  # noqa: E402
from sass_decode_kernels import cubin_usage, instruction_mix, sass_listing  # noqa: E402

SHARED_KIB = {90: 227, 80: 163}  # the most shared memory one block may take: H100/H200, A100
POINTERS = {"Q": "*{dtype}", "K": "*{dtype}", "V": "*{dtype}", "OUT": "*{dtype}", "LSE": "*fp32", "SCORES": "*fp32",
            "MASK": "*u8"}
# The integers a launch at head_dim 128 passes as multiples of 16 (the tensors' strides other than the mask's, the head
# counts), which Triton's launcher marks divisible by 16, as it marks every pointer.
ALIGNED_INTS = {"qb", "qh", "qt", "kb", "kh", "kn", "vb", "vh", "vn", "ob", "oh", "ot", "Hq", "Hkv"}
KERNELS = {"rows": "_attend_rows", "mass": "_column_mass"}


def own_plan(kernel: str) -> tuple[int, int, int, int]:
    prefix = {"rows": "ROW", "mass": "MASS"}[kernel]
    return tuple(getattr(scored_prefill, f"{prefix}_{part}") for part in ("BLOCK_M", "BLOCK_N", "WARPS", "STAGES"))


def compile_pass(kernel: str, plan, arch: int, head_dim: int, dtype: str, has_mask: bool):
    """``kernel`` ("rows" or "mass") compiled for ``arch`` under ``plan`` (queries, keys, warps, stages), for a KV
    group of one query head."""
    function = getattr(scored_prefill, KERNELS[kernel])
    block_m, block_n, warps, stages = plan
    constexprs = dict(G=1, HAS_MASK=has_mask, D=head_dim, DP=triton.next_power_of_2(head_dim), BLOCK_M=block_m,
                      BLOCK_N=block_n, IEEE=dtype == "fp32")
    types = {name: "constexpr" if name in constexprs else
             POINTERS[name].format(dtype=dtype) if name in POINTERS else "fp32" if name == "scaling" else "i32"
             for name in function.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(function.arg_names)
             if name in POINTERS or name in ALIGNED_INTS}
    return triton.compile(ASTSource(function, types, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def shared_kib(kernel: str, plan, arch: int, head_dim: int, dtype: str, has_mask: bool) -> float:
    """KiB of shared memory ``kernel`` compiles to under ``plan``, built with or without a mask."""
    return compile_pass(kernel, plan, arch, head_dim, dtype, has_mask).metadata.shared / 1024


def print_sass(kernel: str, arch: int, head_dim: int, dtype: str) -> None:
    plan = own_plan(kernel)
    registers, stack, sass = cubin_usage(compile_pass(kernel, plan, arch, head_dim, dtype, False), triton)
    texts, loops = sass_listing(sass)
    opcodes = [text.split()[0] for text in texts]
    print(f"{KERNELS[kernel]}: sm_{arch}, head_dim {head_dim}, {dtype}, plan {plan}: registers a thread {registers}, "
          f"stack {stack} B, {len(opcodes)} SASS instructions: {instruction_mix(opcodes)}")
    for first, last in loops:
        print(f"loop of {last - first + 1} instructions: {instruction_mix(opcodes[first:last + 1])}", flush=True)


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dims", type=int_list, default="64,128,256")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--archs", type=int_list, default="90,80")
    parser.add_argument("--sass", action="store_true", help="each pass's registers, spills and loops instead")
    args = parser.parse_args()
    unknown = [a for a in args.archs if a not in SHARED_KIB] + [d for d in args.dtypes.split(",") if d not in
                                                                ("bf16", "fp16", "fp32")]
    if unknown:
        parser.error(f"unknown arch or dtype {unknown[0]!r} (archs 90, 80; dtypes bf16, fp16, fp32)")
    if args.sass:
        for arch in args.archs:
            for head_dim in args.head_dims:
                for dtype in args.dtypes.split(","):
                    for kernel in KERNELS:
                        print_sass(kernel, arch, head_dim, dtype)
        return
    print("| arch | head_dim | dtype | pass | own plan KiB, no mask | own plan KiB, mask | fallback KiB | limit KiB |")
    print("|---:|---:|---|---|---:|---:|---:|---:|")
    for arch in args.archs:
        for head_dim in args.head_dims:
            for dtype in args.dtypes.split(","):
                for kernel in KERNELS:
                    own = [shared_kib(kernel, own_plan(kernel), arch, head_dim, dtype, m) for m in (False, True)]
                    fallback = max(shared_kib(kernel, scored_prefill.FALLBACK_PLAN, arch, head_dim, dtype, m)
                                   for m in (False, True))
                    print(f"| sm_{arch} | {head_dim} | {dtype} | {kernel} | {own[0]:.0f} | {own[1]:.0f} | "
                          f"{fallback:.0f} | "
                          f"{SHARED_KIB[arch]} |", flush=True)


if __name__ == "__main__":
    main()
