"""The benchmark scripts' argument parser: a bad argument is one line on stderr and exit code 2, as in the CLI."""

from __future__ import annotations

import argparse
import sys


class BenchmarkParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors (a bad or missing argument, ``parser.error``) print one line, the
    script's name, the message and where the usage is, instead of the usage block and then the message. Its
    subcommands' parsers are of this class too."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)
