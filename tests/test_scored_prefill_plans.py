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
@pytest.mark.parametrize("has_mask", [False, True], ids=["no-mask", "mask"])
def test_the_fallback_plan_fits_every_gpu(plans, kernel, arch, head_dim, dtype, has_mask):
    used = plans.shared_kib(kernel, plans.scored_prefill.FALLBACK_PLAN, arch, head_dim, dtype, has_mask)
    assert used <= plans.SHARED_KIB[arch], f"{used:.0f} KiB"


@pytest.mark.parametrize("arch", [90, 80])
def test_the_row_pass_plan_fits_an_unpadded_llama_prefill_in_bf16(plans, arch):
    """The plan swept on an H200 (head_dim 128, bf16, no mask) needs no fallback on an H100/H200 or an A100. (With a
    mask, a padded batch, it needs more than either has, and the fallback plan runs: BENCHMARKS.md.)"""
    used = plans.shared_kib("rows", plans.own_plan("rows"), arch, 128, "bf16", False)
    assert used <= plans.SHARED_KIB[arch], f"{used:.0f} KiB"


def test_the_own_plans_compile_without_spills_at_llama_shapes():
    """``--sass`` at head_dim 128 in bf16 for sm_90, typed as a launch types it: each pass at its own plan within 255
    registers, nothing on the stack and no spill in its loops, each loop on the tensor cores through asynchronous
    copies (an unaligned stride would turn them into scalar loads)."""
    import re
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(BENCHMARKS / "scored_prefill_plans.py"), "--sass", "--archs", "90",
                           "--head-dims", "128", "--dtypes", "bf16"], capture_output=True, text=True, timeout=600,
                          cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr
    passes = re.findall(r"^(_\w+): .*registers a thread (\d+), stack (\d+) B", done.stdout, re.M)
    assert [name for name, _, _ in passes] == ["_attend_rows", "_column_mass"], done.stdout
    assert all(int(registers) <= 255 and stack == "0" for _, registers, stack in passes), done.stdout
    loops = [dict(re.findall(r"([A-Z][\w.]*) (\d+)", line.split(";")[1]))
             for line in done.stdout.splitlines() if line.startswith("loop of ")]
    assert len(loops) >= 4, done.stdout  # two key loops a pass: below the diagonal and across it
    assert all(c["STL"] == "0" and int(c["HGMMA"]) > 0 and int(c["LDGSTS"]) > 0 for c in loops), done.stdout
