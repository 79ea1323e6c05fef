"""The scored prefill's plans against the shared memory of real GPUs, compiled here for sm_90 and sm_80 with Triton's
own ptxas (no GPU needed; skipped without Triton): the fallback plan must fit every GPU for the shapes models use."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kvreviver_core.kernels import scored_prefill  # noqa: E402

SHARED_KIB = {90: 227, 80: 163}  # the most shared memory one block may take: H100/H200, A100
POINTERS = {"Q": "*{dtype}", "K": "*{dtype}", "V": "*{dtype}", "OUT": "*{dtype}", "LSE": "*fp32", "SCORES": "*fp32",
            "MASK": "*u8"}


def shared_kib(kernel, plan, arch: int, head_dim: int, dtype: str) -> float:
    block_m, block_n, warps, stages = plan
    constexprs = dict(G=1, HAS_MASK=True, D=head_dim, DP=triton.next_power_of_2(head_dim), BLOCK_M=block_m,
                      BLOCK_N=block_n, IEEE=dtype == "fp32")
    types = {name: "constexpr" if name in constexprs else
             POINTERS[name].format(dtype=dtype) if name in POINTERS else "fp32" if name == "scaling" else "i32"
             for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if name in POINTERS}
    compiled = triton.compile(ASTSource(kernel, types, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    return compiled.metadata.shared / 1024


@pytest.mark.parametrize("kernel", ["_attend_rows", "_column_mass"])
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("head_dim, dtype", [(64, "bf16"), (128, "bf16"), (256, "bf16"), (64, "fp32"), (128, "fp32")])
def test_the_fallback_plan_fits_every_gpu(kernel, arch, head_dim, dtype):
    used = shared_kib(getattr(scored_prefill, kernel), scored_prefill.FALLBACK_PLAN, arch, head_dim, dtype)
    assert used <= SHARED_KIB[arch], f"{used:.0f} KiB"


@pytest.mark.parametrize("arch", [90, 80])
def test_the_row_pass_plan_fits_llama_shapes_in_bf16(arch):
    """The plan swept on an H200 (head_dim 128, bf16) needs no fallback on an H100/H200 or an A100."""
    plan = (scored_prefill.ROW_BLOCK_M, scored_prefill.ROW_BLOCK_N, scored_prefill.ROW_WARPS, scored_prefill.ROW_STAGES)
    assert shared_kib(scored_prefill._attend_rows, plan, arch, 128, "bf16") <= SHARED_KIB[arch]
