"""Run a benchmark script with integer module constants ("knobs") set, in the same process, so that one device call
can compare settings end to end. A bare ``NAME`` is a knob of the decode kernel
(``kvreviver_core.kernels.reviver_decode``); ``MODULE.NAME`` one of ``kvreviver_core.MODULE`` (booleans as 0 / 1).

Usage: python benchmarks/with_knobs.py KNOB=VALUE [KNOB=VALUE ...] SCRIPT.py [SCRIPT's arguments]
e.g.   python benchmarks/with_knobs.py PROGRAMS_PER_SM_LINEAR=8 benchmarks/bench_decode_e2e.py --batches 1
       python benchmarks/with_knobs.py attention.FUSED_PREFILL=0 benchmarks/bench_decode_e2e.py --batches 1
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

from cli_args import require_triton

require_triton()  # before the import below: the knobs' module needs it

from kvreviver_core.kernels import reviver_decode


def usage_error(message: str) -> None:
    print(f"with_knobs: {message}", file=sys.stderr)
    raise SystemExit(2)


def knob_module(qualified: str):
    """The module and constant name of ``NAME`` (reviver_decode's) or ``MODULE.NAME`` (kvreviver_core.MODULE's)."""
    module_name, _, name = qualified.rpartition(".")
    if not module_name:
        return reviver_decode, name
    try:
        return importlib.import_module(f"kvreviver_core.{module_name}"), name
    except ImportError:
        usage_error(f"{qualified!r}: there is no module kvreviver_core.{module_name}")


def main(argv: list[str]) -> None:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    knobs = []
    while argv and "=" in argv[0]:
        qualified, _, value = argv.pop(0).partition("=")
        module, name = knob_module(qualified)
        if not name.isupper() or not isinstance(getattr(module, name, None), int):
            usage_error(f"{qualified!r} is not an integer knob of {module.__name__}")
        try:
            knobs.append((module, name, qualified, int(value)))
        except ValueError:
            usage_error(f"{qualified}'s value must be an integer, got {value!r}")
    if not argv or not argv[0].endswith(".py"):
        usage_error("usage: with_knobs.py KNOB=VALUE [...] SCRIPT.py [arguments]")
    for module, name, qualified, value in knobs:
        setattr(module, name, type(getattr(module, name))(value))
        print(f"with_knobs: {qualified} = {value}", flush=True)
    sys.argv = argv
    sys.path.insert(0, str(Path(argv[0]).resolve().parent))  # as running the script itself would
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
