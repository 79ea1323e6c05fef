"""What every command shares: clean one-line errors with exit code 2, list-valued options, and ``--out``."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, TypeVar

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def print_error(message: str) -> None:
    """The CLI's one ``error:`` line on stderr (``message`` is Rich markup)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def fail(message: str) -> "typer.Exit":
    print_error(message)
    return typer.Exit(code=2)


def clean_errors(fn: F) -> F:
    """Turn user-facing errors (ValueError, FileNotFoundError, UsageError, OSError) into one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UsageError, ValueError, FileNotFoundError, OSError, KeyError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise fail(message) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; results written so far are kept")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated numbers, got {text!r}") from None


def parse_ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None


def parse_names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


DEVICE_MAPS = ("auto",)
DEVICE_MAP_HELP = "auto: spread the model's layers over every visible GPU (accelerate), for models too big for one."


def check_device_map(device: str, device_map: str | None) -> None:
    """``--device-map`` needs GPUs, and one process: torchrun ranks each hold a whole model on their own GPU."""
    if device_map is None:
        return
    import torch

    from kvreviver_core.distributed import RankInfo

    if device_map not in DEVICE_MAPS:
        raise UsageError(f"--device-map takes {' or '.join(DEVICE_MAPS)}, got {device_map!r}")
    if device == "cpu":
        raise UsageError(f"--device-map spreads the model over GPUs; it cannot go with --device {device}")
    if not torch.cuda.is_available():
        raise UsageError("--device-map auto spreads the model over GPUs, but no NVIDIA GPU was found")
    if RankInfo.from_env().distributed:
        raise UsageError("--device-map spreads one model over all GPUs, while torchrun gives each rank a GPU and a "
                         "model of its own: use one or the other")


def check_out_path(out: Path | None, folder: bool = True) -> None:
    """``--out`` can be written: nothing there yet, or a folder (a file where not ``folder``), and no file in the way
    of its parent folders."""
    if out is None:
        return
    if out.exists() and out.is_dir() != folder:
        raise UsageError(f"--out {out} exists and is {'not a folder' if folder else 'a folder'}")
    blocker = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"--out {out} cannot be created: {blocker} is a file, not a folder")
