"""benchmarks/sass_decode_kernels.py: the decode kernels compiled for sm_90 without a GPU, and its one-line errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "sass_decode_kernels.py"


def run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *arguments], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("group, tensor_cores", [(1, False), (4, True)])
def test_the_linear_launch_compiles_its_exact_loop_for_the_group(group, tensor_cores):
    """A KV group of one query head attends its exact slots on the CUDA cores, with no tensor-core tile and its
    reads issued by hand; a larger group on tensor cores, fed by asynchronous copies."""
    pytest.importorskip("triton")
    done = run("--combine", "mean", "--group", str(group))
    assert done.returncode == 0, done.stderr
    registers = int(re.search(r"registers a thread (\d+)", done.stdout).group(1))
    assert 0 < registers <= 255
    loops = [line for line in done.stdout.splitlines() if line.startswith("loop of ")]
    assert loops, done.stdout
    counts = [dict(re.findall(r"(\w[\w.]*) (\d+)", line.split(";")[1])) for line in loops]
    on_tensor_cores = [int(c["HMMA"]) > 0 and int(c["LDGSTS"]) > 0 for c in counts]
    if tensor_cores:
        assert any(on_tensor_cores), loops
    else:
        assert all(int(c["HMMA"]) == 0 for c in counts), loops
        assert any(re.search(r"FFMA [1-9]", line) for line in loops), loops  # the products on the CUDA cores


def test_the_linear_combines_other_launches_compile(tmp_path):
    pytest.importorskip("triton")
    for kernel, loops in (("vague", True), ("bucket-sums", True)):  # a bucket run's last piece loops to its end
        done = run("--kernel", kernel)
        assert done.returncode == 0, done.stderr
        assert re.search(r"registers a thread \d+", done.stdout)
        assert ("loop of " in done.stdout) == loops, done.stdout


def test_listing_prints_each_loops_instructions_with_the_opcodes_it_counts():
    pytest.importorskip("triton")
    done = run("--kernel", "vague", "--listing")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("loop of ")]
    assert heads, done.stdout
    for head in heads:
        size = int(re.match(r"loop of (\d+) instructions", lines[head]).group(1))
        body = lines[head + 1:head + 1 + size]
        assert len(body) == size and all(line.startswith("    ") for line in body)
        assert body[-1].split()[0] == "BRA"  # a loop ends with its branch back
        ldg = sum(line.split()[0].split(".")[0] == "LDG" for line in body)
        assert f"LDG {ldg}," in lines[head].split(";")[1]


def test_a_tree_without_the_kernel_or_a_median_chain_launch_is_a_one_line_error(tmp_path):
    pytest.importorskip("triton")
    for arguments in (("--tree", str(tmp_path)), ("--kernel", "vague", "--combine", "median")):
        done = run(*arguments)
        assert done.returncode == 2 and "Traceback" not in done.stderr, arguments
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("sass_decode_kernels:")


def test_arguments_no_launch_could_have_are_one_line_errors():
    for arguments in (("--block-exact", "3"), ("--block-exact", "8"), ("--warps", "3"), ("--stages", "0"),
                      ("--head-dim", "0")):
        done = run(*arguments)
        assert done.returncode == 2 and "Traceback" not in done.stderr, arguments
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("sass_decode_kernels:")
