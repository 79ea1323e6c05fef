"""The scored prefill's plans against the shared memory of real GPUs, compiled here for sm_90 and sm_80 with Triton's
own ptxas (no GPU needed; skipped without Triton) by ``benchmarks/scored_prefill_plans.py``: the fallback plan must
fit every GPU for the shapes models use."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def plans(monkeypatch):
    """benchmarks/scored_prefill_plans, imported as the scripts import their helpers: their folder on sys.path."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import scored_prefill_plans

    return scored_prefill_plans


@pytest.mark.parametrize("kernel", ["rows", "mass"])
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("head_dim, dtype", [(128, "bf16"), (256, "bf16"), (128, "fp32")])
def test_the_fallback_plan_fits_every_gpu(plans, kernel, arch, head_dim, dtype):
    used = plans.shared_kib(kernel, plans.scored_prefill.FALLBACK_PLAN, arch, head_dim, dtype)
    assert used <= plans.SHARED_KIB[arch], f"{used:.0f} KiB"


@pytest.mark.parametrize("arch", [90, 80])
def test_the_row_pass_plan_fits_llama_shapes_in_bf16(plans, arch):
    """The plan swept on an H200 (head_dim 128, bf16) needs no fallback on an H100/H200 or an A100."""
    assert plans.shared_kib("rows", plans.own_plan("rows"), arch, 128, "bf16") <= plans.SHARED_KIB[arch]
