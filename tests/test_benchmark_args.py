"""The benchmark scripts' bad arguments: one line on stderr and exit code 2, never the usage block or a traceback."""

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if "= BenchmarkParser(" in p.read_text())
NEEDS_TRITON = "needs Triton (pip install triton), which is not installed\n"
# Each script with options of comma-separated integers: one of them, after the subcommand it belongs to.
LIST_OPTIONS = {
    "ab_revisions.py": "run --contexts",
    "bench_decode_attention.py": "--contexts",
    "bench_decode_e2e.py": "--batches",
    "bench_exact_loop.py": "--stages",
    "bench_niah_fig5.py": "--lengths",
    "bench_scored_prefill.py": "--tokens",
    "bench_vague_probe.py": "--layers",
    "profile_compress_step.py": "--contexts",
    "profile_decode_e2e.py": "--contexts",
    "profile_decode_kernels.py": "--contexts",
    "profile_sampler_overhead.py": "--batch",
    "scored_prefill_plans.py": "--head-dims",
}


@pytest.fixture
def cli_args(monkeypatch):
    """benchmarks/cli_args, imported as the scripts import it: their folder on sys.path."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import cli_args

    return cli_args


def parser_error(parser, arguments, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(arguments)
    assert stopped.value.code == 2
    return capsys.readouterr().err


def one_line_error(script: str, arguments: list[str]) -> str | None:
    """The script's stderr for these arguments, checked to be one line, no traceback, exit code 2; None where that
    line is the one of a script whose kernels need Triton on a machine without it (as CI)."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *arguments], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    if importlib.util.find_spec("triton") is None and done.stderr.endswith(NEEDS_TRITON):
        assert done.stderr.startswith(f"{script}: error: ")
        return None
    return done.stderr


def test_the_parser_and_its_subcommands_print_one_line(capsys, cli_args):
    parser = cli_args.BenchmarkParser(prog="bench.py")
    parser.add_argument("--contexts", type=int, required=True)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run").add_argument("--calls", type=int)
    for arguments, said in ((["--contexts", "x"], "invalid int value: 'x'"), (["--nope"], "--contexts"),
                            (["--contexts", "1", "run", "--calls", "y"], "invalid int value: 'y'")):
        err = parser_error(parser, arguments, capsys)
        assert len(err.strip().splitlines()) == 1 and said in err and err.endswith("(see --help)\n"), err
    parser_error(parser, ["--contexts", "1", "--extra"], capsys)


def test_int_list_reads_comma_separated_integers_and_nothing_else(capsys, cli_args):
    for text, read in (("8192", [8192]), ("8192,32768", [8192, 32768]), ("0,-1", [0, -1]), ("1, 16", [1, 16])):
        assert cli_args.int_list(text) == read
    for text in ("1,x", "32k", "1.5", "", "1,,2", "1,"):
        with pytest.raises(argparse.ArgumentTypeError) as refused:
            cli_args.int_list(text)
        assert str(refused.value) == f"expected comma-separated integers, got {text!r}"
    parser = cli_args.BenchmarkParser(prog="bench.py")
    parser.add_argument("--contexts", type=cli_args.int_list, default="8192,32768")
    assert parser.parse_args([]).contexts == [8192, 32768]  # argparse applies the type to a string default
    assert parser_error(parser, ["--contexts", "1,x"], capsys) == (
        "bench.py: error: argument --contexts: expected comma-separated integers, got '1,x' (see --help)\n")


def test_the_scripts_parse_with_the_one_line_parser():
    assert len(SCRIPTS) >= 19, SCRIPTS
    plain = [p.name for p in BENCHMARKS.glob("*.py") if "argparse.ArgumentParser(" in p.read_text()]
    assert plain == [], f"{plain} parse with argparse's own parser: use cli_args.BenchmarkParser"


def test_every_script_with_integer_lists_is_checked_below():
    typed = sorted(p.name for p in BENCHMARKS.glob("*.py") if "type=int_list" in p.read_text())
    assert typed == sorted(LIST_OPTIONS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unknown_argument_is_a_one_line_error(script):
    """Or, for a script whose kernels need Triton on a machine without it (as CI), that one-line error."""
    err = one_line_error(script, ["--no-such-argument"])
    if err is not None:
        assert err.startswith(f"{script}: error: ") and err.rstrip().endswith("(see --help)")


@pytest.mark.parametrize("script", sorted(LIST_OPTIONS))
def test_a_bad_integer_list_is_a_one_line_error(script):
    """The parser's error, before any work: not a ValueError's traceback from a conversion after parsing."""
    *subcommand, option = LIST_OPTIONS[script].split()
    err = one_line_error(script, [*subcommand, option, "1,x"])
    if err is not None:
        prog = " ".join([script, *subcommand])
        assert err == f"{prog}: error: argument {option}: expected comma-separated integers, got '1,x' (see --help)\n"


NEEDS_CUDA = ["bench_decode_attention.py", "bench_decode_equivalence.py", "bench_exact_loop.py",
              "bench_layer_step_host.py", "bench_scored_prefill.py", "profile_decode_e2e.py",
              "profile_decode_kernels.py"]


def test_the_scripts_that_need_a_gpu_share_the_cuda_check():
    """Every script that calls it is listed below, so the test after this one covers it."""
    calling = sorted(path.name for path in BENCHMARKS.glob("*.py") if "require_cuda(" in path.read_text()
                     and path.name != "cli_args.py")
    assert calling == sorted(NEEDS_CUDA)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("script", NEEDS_CUDA)
def test_no_gpu_is_a_one_line_error(script):
    err = one_line_error(script, [])
    if err is not None:
        assert err.startswith(f"{script}: error: needs a CUDA GPU (") and err.rstrip().endswith("torch sees none")
