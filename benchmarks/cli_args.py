"""The benchmark scripts' argument parser, its type for comma-separated integers, and their Triton and CUDA checks:
a bad argument, or no Triton or no GPU for a script that needs one, is one line on stderr and exit code 2, as in the
CLI."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


class BenchmarkParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors (a bad or missing argument, ``parser.error``) print one line, the
    script's name, the message and where the usage is, instead of the usage block and then the message. Its
    subcommands' parsers are of this class too."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def int_list(text: str) -> list[int]:
    """``type=`` for an option of comma-separated integers (``--contexts 8192,32768``): as the parser's type, and not
    a conversion after parsing, a bad or empty item is the parser's one-line error rather than a ValueError's
    traceback. argparse applies it to a string default too."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def require_triton() -> None:
    """Exit with a one-line error (code 2) where Triton is not installed: for the scripts that compile Triton kernels,
    called before they import it, so that they do not end in an ImportError's traceback."""
    if importlib.util.find_spec("triton") is None:
        print(f"{Path(sys.argv[0]).name}: error: needs Triton (pip install triton), which is not installed",
              file=sys.stderr)
        raise SystemExit(2)


def require_cuda(why: str) -> None:
    """Exit with a one-line error (code 2) where torch sees no CUDA device: for the scripts that measure a GPU."""
    import torch

    if not torch.cuda.is_available():
        print(f"{Path(sys.argv[0]).name}: error: needs a CUDA GPU ({why}), and torch sees none", file=sys.stderr)
        raise SystemExit(2)
