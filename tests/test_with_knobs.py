"""benchmarks/with_knobs.py: the knobs reach the script it runs, and bad input is a one-line usage error (exit 2)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # the knobs live in the Triton kernel's module

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "with_knobs.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=120)


def test_knobs_are_set_for_the_script_and_its_arguments_passed(tmp_path):
    script = tmp_path / "show.py"
    script.write_text("import sys\nfrom kvreviver_core.kernels import reviver_decode as rd\n"
                      "print(rd.PROGRAMS_PER_SM_LINEAR, rd.BLOCK_EXACT, sys.argv[1:])\n")
    from kvreviver_core.kernels import reviver_decode

    done = run("PROGRAMS_PER_SM_LINEAR=3", str(script), "--flag", "x")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"3 {reviver_decode.BLOCK_EXACT} ['--flag', 'x']"


def test_a_knob_of_another_module_is_set_with_its_type(tmp_path):
    script = tmp_path / "show.py"
    script.write_text("from kvreviver_core import attention\nprint(repr(attention.FUSED_PREFILL))\n")
    done = run("attention.FUSED_PREFILL=0", str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"


@pytest.mark.parametrize("args", [("NOT_A_KNOB=1", "x.py"), ("BLOCK_EXACT=wide", "x.py"), ("BLOCK_EXACT=64",),
                                  ("nosuchmodule.KNOB=1", "x.py"), ("attention.CHUNK=1", "x.py")])
def test_bad_input_is_a_one_line_usage_error(args):
    done = run(*args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("with_knobs: ")


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_the_usage_and_runs_nothing(flag):
    done = run(flag)
    assert done.returncode == 0, done.stderr
    assert "Usage: python benchmarks/with_knobs.py KNOB=VALUE" in done.stdout
