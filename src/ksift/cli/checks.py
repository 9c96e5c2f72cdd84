"""Checks of command-line values shared by the commands: each raises ConfigError (exit 2) naming the option."""

from __future__ import annotations

from ksift.errors import ConfigError

# SQLite's integers are signed 64-bit: a larger LIMIT is an OverflowError deep in the query.
MAX_LIMIT = 2**63 - 1


def non_empty(option: str, value: str | None) -> None:
    """An option given as "" is refused: it would otherwise silently mean its default."""
    if value is not None and not value.strip():
        raise ConfigError(option, f"must not be empty, got {value!r} (leave the option out for its default)")


def check_limit(value: int, option: str = "--limit") -> None:
    if not 1 <= value <= MAX_LIMIT:
        raise ConfigError(option, f"must be between 1 and {MAX_LIMIT}, got {value}")
