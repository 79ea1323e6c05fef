"""``--config FILE.toml``: the same keys as a command's flags; flags given on the command line win."""

from __future__ import annotations

import tomllib
from pathlib import Path

import click
import typer
from click.core import ParameterSource

from kvreviver_cli.common import UsageError


def load_toml(path: Path, command: str) -> dict:
    """Top-level keys, overlaid with the table named after ``command`` if the file has one."""
    if not path.is_file():
        raise UsageError(f"config file {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    section = data.get(command, {})
    flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
    if isinstance(section, dict):
        flat.update(section)
    return {key.replace("-", "_"): _as_flag_value(value) for key, value in flat.items()}


def _as_flag_value(value):
    # Lists in TOML stand for the comma-separated lists the flags take.
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


def apply_config(ctx: typer.Context, config: Path | None, values: dict, command: str) -> dict:
    """Return ``values`` with defaults replaced by the config file's entries (explicit flags untouched)."""
    if config is None:
        return values
    from_file = load_toml(config, command)
    unknown = sorted(set(from_file) - set(values))
    if unknown:
        raise UsageError(f"config file {config} has unknown key(s) for '{command}': {', '.join(unknown)}")
    merged = dict(values)
    for name, value in from_file.items():
        source = ctx.get_parameter_source(name)
        # By name: typer >= 0.26 vendors its own click, whose ParameterSource is a different enum.
        if source is None or source.name in (ParameterSource.DEFAULT.name, ParameterSource.DEFAULT_MAP.name):
            param = next((p for p in ctx.command.params if p.name == name), None)
            merged[name] = _convert(ctx, param, value, config)
    return merged


def _convert(ctx: typer.Context, param: click.Parameter | None, value, config: Path):
    if param is None:
        return value
    # click would take true for 1, 1 for true, and 2.5 for 2: TOML has booleans and integers, so ask for them.
    bad = f"config file {config}: bad value for {param.name}:"
    is_flag = getattr(param, "is_bool_flag", False)
    if isinstance(value, bool) != is_flag:
        if is_flag:
            raise UsageError(f"{bad} {value!r}, but {param.opts[0]} is an on/off flag: write true or false")
        raise UsageError(f"{bad} a boolean ({str(value).lower()}), but {param.opts[0]} is not an on/off flag")
    try:
        if hasattr(param, "type_cast_value"):  # click's own parameters (typer < 0.26)
            converted = param.type_cast_value(click.Context(click.Command("config")), value)
        else:
            converted = param.process_value(ctx, value)  # typer >= 0.26 parameters, on its vendored click
    except Exception as exc:
        if type(exc).__name__ != "BadParameter":  # either click's
            raise
        raise UsageError(f"{bad} {exc.message}") from None
    if isinstance(value, float) and isinstance(converted, int):
        raise UsageError(f"{bad} {value!r}, but {param.opts[0]} takes an integer")
    return converted
