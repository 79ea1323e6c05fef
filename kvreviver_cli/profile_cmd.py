"""`kvreviver profile`: not implemented yet (its issue is open). It says so and exits with code 2."""

from __future__ import annotations

from kvreviver_cli.common import fail


def profile_command() -> None:
    raise fail("'profile' is not implemented yet")
