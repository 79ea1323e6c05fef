"""The benchmark scripts' bad arguments: one line on stderr and exit code 2, never the usage block or a traceback."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if "= BenchmarkParser(" in p.read_text())


def parser_error(parser, arguments, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(arguments)
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_the_parser_and_its_subcommands_print_one_line(capsys):
    sys.path.insert(0, str(BENCHMARKS))
    from cli_args import BenchmarkParser

    parser = BenchmarkParser(prog="bench.py")
    parser.add_argument("--contexts", type=int, required=True)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run").add_argument("--calls", type=int)
    for arguments, said in ((["--contexts", "x"], "invalid int value: 'x'"), (["--nope"], "--contexts"),
                            (["--contexts", "1", "run", "--calls", "y"], "invalid int value: 'y'")):
        err = parser_error(parser, arguments, capsys)
        assert len(err.strip().splitlines()) == 1 and said in err and err.endswith("(see --help)\n"), err
    parser_error(parser, ["--contexts", "1", "--extra"], capsys)


def test_the_scripts_parse_with_the_one_line_parser():
    assert len(SCRIPTS) >= 19, SCRIPTS
    plain = [p.name for p in BENCHMARKS.glob("*.py") if "argparse.ArgumentParser(" in p.read_text()]
    assert plain == [], f"{plain} parse with argparse's own parser: use cli_args.BenchmarkParser"


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unknown_argument_is_a_one_line_error(script):
    """Or, for a script whose kernels need Triton on a machine without it (as CI), that one-line error."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--no-such-argument"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    if importlib.util.find_spec("triton") is None and done.stderr.endswith("needs Triton (pip install triton), "
                                                                           "which is not installed\n"):
        assert done.stderr.startswith(f"{script}: error: ")
        return
    assert done.stderr.startswith(f"{script}: error: ") and done.stderr.rstrip().endswith("(see --help)")
