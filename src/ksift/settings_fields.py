"""Field converters shared by every config section: (raw TOML value, source, dotted field) -> value.

Each checks one value and returns it converted, or raises ConfigError naming
the source, the field and the bad value, so every section words the same
mistake the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from ksift.errors import ConfigError
from ksift.units import format_duration, parse_duration


def boolean(value: object, source: str, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(source, f"invalid value {value!r}: must be true or false", field=field)
    return value


def integer(value: object, source: str, field: str) -> int:
    # bool is an int subclass: `queue_size = true` is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(source, f"invalid value {value!r}: must be an integer", field=field)
    return value


# How integer_between words a range: "between 1 and 10" (the default), or "from 1 to 10".
BETWEEN_AND = ("between", "and")
FROM_TO = ("from", "to")


def integer_between(value: object, source: str, field: str, low: int, high: int,
                    words: tuple[str, str] = BETWEEN_AND) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(source, f"invalid value {value!r}: must be an integer {words[0]} {low} {words[1]} {high}",
                          field=field)
    return value


def duration_between(value: object, source: str, field: str, low: float, high: float) -> float:
    """A duration ("500ms", "2m", or seconds) within [low, high], as seconds."""
    seconds = parse_duration(value, source=source, field=field)
    if not low <= seconds <= high:
        raise ConfigError(source, f"invalid value {value!r}: must be between {format_duration(low)} and "
                                  f"{format_duration(high)}", field=field)
    return seconds


def string(value: object, source: str, field: str) -> str:
    """Any string, surrounding white space removed."""
    if not isinstance(value, str):
        raise ConfigError(source, f"invalid value {value!r}: must be a string", field=field)
    return value.strip()


def non_empty_path(value: object, source: str, field: str, what: str = "path") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(source, f"invalid value {value!r}: must be a non-empty {what}", field=field)
    return value


def choice(value: object, source: str, field: str, choices: Sequence[str], fold_case: bool = False) -> str:
    """One of `choices`; with fold_case, in any case ("INFO"), returned lowercased."""
    folded = value.lower() if fold_case and isinstance(value, str) else value
    if not isinstance(folded, str) or folded not in choices:
        raise ConfigError(source, f"invalid value {value!r} (expected one of: {', '.join(choices)})", field=field)
    return folded
