"""Click's own usage errors, through the real entry point: one ``error:`` line on stderr and exit code 2.

Every case fails while Click parses the command line (or in the CLI's first checks), before any model is
loaded, so the tests need no GPU, no Triton and no download. Each run still imports torch (a few seconds), so
the runs are started together, once for the module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOX = set("╭╮╰╯│─┌┐└┘")

CASES: dict[str, list[str]] = {
    "unknown_option": ["eval", "--ratios", "1"],
    "unknown_command": ["evall"],
    "bad_int": ["profile", "--context", "abc"],  # --context is an int option
    "missing_value": ["eval", "--budget"],
    "own_check": ["eval", "--budget", "1.5"],
    "subcommand_help": ["eval", "--help"],
    "niah_help": ["niah", "--help"],
    "profile_help": ["profile", "--help"],
    "no_args": [],
}


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess[str]]:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "kvreviver_cli", *args], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, args in CASES.items()
    }
    done = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return done


def one_error_line(run: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a usage error, after checking the exit code and the absence of a box."""
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    assert not BOX & set(run.stderr), run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: "), run.stderr
    assert "Usage:" not in run.stderr and "Try " not in run.stderr
    return lines[0]


def test_unknown_option(runs) -> None:
    line = one_error_line(runs["unknown_option"])
    assert "No such option: --ratios" in line
    assert line.endswith(" eval --help')"), line  # the hint names the subcommand


def test_unknown_subcommand(runs) -> None:
    line = one_error_line(runs["unknown_command"])
    assert "No such command 'evall'" in line
    assert "eval --help" not in line and line.endswith(" --help')"), line  # the hint is the top-level help


def test_bad_int_value(runs) -> None:
    line = one_error_line(runs["bad_int"])
    assert "'--context'" in line and "integer" in line


def test_missing_option_value(runs) -> None:
    line = one_error_line(runs["missing_value"])
    assert "'--budget' requires an argument" in line


def test_own_check_keeps_its_message(runs) -> None:
    assert one_error_line(runs["own_check"]) == "error: budget fraction must be in (0, 1], got 1.5"


def test_subcommand_help_exits_0(runs) -> None:
    run = runs["subcommand_help"]
    assert run.returncode == 0, run.stderr
    assert "Usage:" in run.stdout and " eval " in run.stdout and "--budget" in run.stdout
    assert "error" not in run.stderr and "Traceback" not in run.stderr


def test_no_arguments_shows_help(runs) -> None:
    run = runs["no_args"]
    assert "Traceback" not in run.stderr and "error:" not in run.stderr
    assert run.returncode == 2, run.stderr  # Click's own exit code for no_args_is_help (8.2+)
    help_text = run.stdout + run.stderr
    assert "Usage:" in help_text
    for command in ("eval", "niah", "profile", "sweep-ratios", "calibrate"):
        assert command in help_text


@pytest.mark.parametrize("command", ["niah", "profile"])
def test_config_help_names_the_commands_table(runs, command) -> None:
    """Rich would take ``[niah]`` in a help text for markup and print nothing of it."""
    run = runs[f"{command}_help"]
    assert run.returncode == 0, run.stderr
    assert f"([{command}] table)" in run.stdout, run.stdout
