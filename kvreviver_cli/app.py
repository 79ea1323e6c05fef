"""``kvreviver``: evaluate, probe and profile reversible KV-cache compression."""

from __future__ import annotations

import typer

from kvreviver_cli import calibrate_cmd, eval_cmd, niah_cmd, profile_cmd, sweep_cmd

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
