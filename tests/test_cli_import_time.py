"""The CLI starts without torch or transformers: ``--help`` and usage errors come back at once.

The commands import the model stack when they run; loading the app, and Click's parsing, need none of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")
COMMANDS = ("eval", "niah", "profile", "sweep-ratios", "calibrate")


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=300)


def _heavy_after(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code``, then print the heavy modules it left imported (even when it exits through SystemExit)."""
    return _python(f"import atexit, sys\n"
                   f"atexit.register(lambda: print('heavy:', [m for m in {HEAVY!r} if m in sys.modules]))\n{code}",
                   *args)


def test_importing_the_app_imports_neither_torch_nor_transformers() -> None:
    run = _python(f"import sys, kvreviver_cli.app; bad = [m for m in {HEAVY!r} if m in sys.modules]; "
                  "print(bad); sys.exit(1 if bad else 0)")
    assert run.returncode == 0, (run.stdout, run.stderr)


def test_help_lists_the_commands_without_torch() -> None:
    run = _heavy_after("from kvreviver_cli.app import main; main(sys.argv[1:])", "--help")
    assert run.returncode == 0, run.stderr
    assert "heavy: []" in run.stdout, run.stdout
    for command in COMMANDS:
        assert command in run.stdout, run.stdout


def test_python_m_help_exits_0_and_lists_the_commands() -> None:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "kvreviver_cli", "--help"], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for command in COMMANDS:
        assert command in run.stdout, run.stdout


def test_command_help_and_usage_errors_need_no_torch() -> None:
    for args, code in ((["eval", "--help"], 0), (["niah", "--help"], 0), (["profile", "--help"], 0),
                       (["sweep-ratios", "--help"], 0), (["eval", "--ratios", "1"], 2),
                       (["profile", "--context", "abc"], 2)):
        run = _heavy_after("from kvreviver_cli.app import main; main(sys.argv[1:])", *args)
        assert run.returncode == code, (args, run.stdout, run.stderr)
        assert "heavy: []" in run.stdout, (args, run.stdout)


def test_the_package_keeps_its_public_names() -> None:
    run = _python("import kvreviver_core; from kvreviver_core import Budget, CompressedCache, make_cache, list_methods\n"
                  "assert kvreviver_core.make_cache is make_cache and set(kvreviver_core.__all__) <= set(dir(kvreviver_core))\n"
                  "assert 'full' in list_methods() and isinstance(Budget(0.5), Budget)")
    assert run.returncode == 0, run.stderr


def test_calibrate_help_gives_the_calibration_constant_as_the_tokens_default() -> None:
    """--tokens' default is written in its help (the constant's module imports torch): the two must agree."""
    from typer.testing import CliRunner

    from kvreviver_cli.app import app
    from kvreviver_core.calibration import CALIBRATION_CHUNK, CALIBRATION_TOKENS

    result = CliRunner().invoke(app, ["calibrate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"({CALIBRATION_CHUNK}-token sequences; default {CALIBRATION_TOKENS})" in result.output, result.output
