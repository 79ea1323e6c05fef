"""The ``kvreviver`` command line: a thin Typer layer over :mod:`kvreviver_core`."""
