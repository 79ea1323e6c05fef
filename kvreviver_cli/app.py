"""``kvreviver``: evaluate, probe and profile reversible KV-cache compression."""

from __future__ import annotations

import sys
from typing import NoReturn

import click
import typer
from rich.markup import escape

from kvreviver_cli import calibrate_cmd, eval_cmd, niah_cmd, profile_cmd, sweep_cmd
from kvreviver_cli.common import err_console, print_error

app = typer.Typer(
    name="kvreviver",
    help="Reversible KV-cache compression (KVReviver) against eviction and merging baselines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("eval", help="ROUGE on summarization for several methods and budgets.")(eval_cmd.eval_command)
app.command("niah", help="Needle-in-a-haystack grid over methods, with heatmaps.")(niah_cmd.niah_command)
app.command("profile", help="Prefill time, decode tokens/s and peak GPU memory (NVML) per batch size.")(profile_cmd.profile_command)
app.command("sweep-ratios", help="Vague/Candidate/Recent split sweep (the paper's Tables 2-3).")(sweep_cmd.sweep_command)
app.command("calibrate", help="Fit a calibrated method (vector, echokv) to a model and cache its weights.")(calibrate_cmd.calibrate_command)


# Typer >= 0.26 parses with its own vendored copy of Click, whose exceptions are not click's classes (they
# derive from typer.TyperException); older Typer raises click's own. Catch either (duplicates are harmless).
_EXIT = (typer.Exit, click.exceptions.Exit)
_ABORT = (typer.Abort, click.exceptions.Abort)
_CLI_ERROR = (click.ClickException, getattr(typer, "TyperException", click.ClickException))


def _one_line_error(exc: click.ClickException | typer.TyperException) -> int:
    """Print a Click/Typer error as one ``error:`` line on stderr (the CLI's own style) and return its exit code."""
    # ``no_args_is_help``: Click >= 8.2 (and Typer's copy) signal it with NoArgsIsHelpError, a UsageError whose
    # message is the help text. Rich help was already printed while the error was built, leaving the message
    # empty; plain Click help is in the message, shown on stderr as Click does. Matched by name, as Typer
    # itself does: the class is private.
    if type(exc).__name__ == "NoArgsIsHelpError":
        if exc.format_message().strip():
            typer.echo(exc.format_message(), err=True)
        return exc.exit_code
    message = " ".join(exc.format_message().split()) or type(exc).__name__
    # Usage errors carry the context of their command (not always: a missing option value comes without one).
    ctx = getattr(exc, "ctx", None)
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        message += f" (see '{ctx.command_path} {ctx.help_option_names[0]}')"
    print_error(escape(message))
    return exc.exit_code


def _run(args: list[str] | None) -> int:
    # standalone_mode=False: Click raises its errors to us instead of printing its multi-line usage box; it then
    # also returns Exit's code (``--help``, ``typer.Exit(code)``) in place of exiting, so an int is an exit code.
    try:
        result = app(args=args, standalone_mode=False)
    except _EXIT as exc:  # Typer returns its own Exit's code; click's Exit (Typer >= 0.26) gets through
        return exc.exit_code
    except _ABORT:
        err_console.print("Aborted!", highlight=False)
        return 1
    except _CLI_ERROR as exc:
        return _one_line_error(exc)
    except KeyboardInterrupt:  # Typer maps it to Exit(130) while parsing or running; this covers the rest
        return 130
    # Any other return value is a command's result (usually None), which standalone Click ignores: success.
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def main(args: list[str] | None = None) -> NoReturn:
    """Console entry point: ``app()``, but Click's usage errors come out as one line with exit code 2."""
    sys.exit(_run(args))


if __name__ == "__main__":
    main()
