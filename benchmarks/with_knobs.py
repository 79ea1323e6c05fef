"""Run a benchmark script with knobs of the decode kernel (``kvreviver_core.kernels.reviver_decode``'s module
constants) set, in the same process, so that one device call can compare split plans end to end.

Usage: python benchmarks/with_knobs.py KNOB=VALUE [KNOB=VALUE ...] SCRIPT.py [SCRIPT's arguments]
e.g.   python benchmarks/with_knobs.py PROGRAMS_PER_SM_LINEAR=8 benchmarks/bench_decode_e2e.py --batches 1
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from cli_args import require_triton

require_triton()  # before the import below: the knobs' module needs it

from kvreviver_core.kernels import reviver_decode


def usage_error(message: str) -> None:
    print(f"with_knobs: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str]) -> None:
    knobs = {}
    while argv and "=" in argv[0]:
        name, _, value = argv.pop(0).partition("=")
        if not name.isupper() or not isinstance(getattr(reviver_decode, name, None), int):
            usage_error(f"{name!r} is not an integer knob of reviver_decode")
        try:
            knobs[name] = int(value)
        except ValueError:
            usage_error(f"{name}'s value must be an integer, got {value!r}")
    if not argv or not argv[0].endswith(".py"):
        usage_error("usage: with_knobs.py KNOB=VALUE [...] SCRIPT.py [arguments]")
    for name, value in knobs.items():
        setattr(reviver_decode, name, value)
        print(f"with_knobs: {name} = {value}", flush=True)
    sys.argv = argv
    sys.path.insert(0, str(Path(argv[0]).resolve().parent))  # as running the script itself would
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
