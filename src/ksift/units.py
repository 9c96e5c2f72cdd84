"""Durations as written in config and rules files, and back again for summaries.

Config values are either plain numbers of seconds or strings with a unit
("500ms", "1.5s", "2m"). Everything inside ksift works in float seconds.
"""

from __future__ import annotations

import math
import re

from ksift.errors import ConfigError

# Seconds per unit. Only short, unambiguous suffixes: "m" is minutes, never metres
# or months, and there is no "d" because no ksift duration spans days.
_UNIT_SECONDS = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

# A non-negative decimal number followed by a unit; no sign, no exponent, so
# "-1s" and "1e3ms" are refused rather than guessed at.
_DURATION_RE = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]+)")

_EXPECTED = 'expected seconds as a number or a string like "250us", "500ms", "1.5s", "2m", "1h"'


def parse_duration(value: object, *, source: str, field: str) -> float:
    """Return `value` as float seconds, or raise ConfigError naming field and value."""
    # bool is an int subclass; `tick = true` is a typo, not one second.
    if isinstance(value, bool):
        raise ConfigError(source, f"invalid duration {value!r}: {_EXPECTED}", field=field)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_duration_string(value, source=source, field=field)
    else:
        raise ConfigError(source, f"invalid duration {value!r}: {_EXPECTED}", field=field)
    # TOML allows inf and nan floats; neither is a usable duration.
    if not math.isfinite(seconds):
        raise ConfigError(source, f"invalid duration {value!r}: must be finite", field=field)
    if seconds < 0:
        raise ConfigError(source, f"invalid duration {value!r}: must not be negative", field=field)
    return seconds


def _parse_duration_string(text: str, *, source: str, field: str) -> float:
    stripped = text.strip().lower()
    if stripped.startswith("-"):
        raise ConfigError(source, f"invalid duration {text!r}: must not be negative", field=field)
    match = _DURATION_RE.fullmatch(stripped)
    if match is None:
        # A bare number in quotes is most likely a forgotten unit; say so.
        hint = " (missing unit?)" if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", stripped) else ""
        raise ConfigError(source, f"invalid duration {text!r}{hint}: {_EXPECTED}", field=field)
    unit = match.group("unit")
    if unit not in _UNIT_SECONDS:
        known = ", ".join(_UNIT_SECONDS)
        raise ConfigError(
            source, f"invalid duration {text!r}: unknown unit {unit!r} (known units: {known})", field=field
        )
    return float(match.group("number")) * _UNIT_SECONDS[unit]


def format_duration(seconds: float) -> str:
    """Short human form of a duration: 1s, 500ms, 2m, 1.5s, 250us.

    Whole multiples use the largest unit that fits exactly (120 -> "2m", 90 -> "90s");
    anything else of a second or more is shown in seconds with decimals ("1.5s").
    """
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds >= 1:
        for unit in ("h", "m", "s"):
            whole = _whole(seconds / _UNIT_SECONDS[unit])
            if whole is not None:
                return f"{whole}{unit}"
        return f"{_decimal(seconds)}s"
    # Below one second, multiply rather than divide: 0.3 * 1000 is exactly 300.0.
    for unit, factor in (("ms", 1e3), ("us", 1e6)):
        whole = _whole(seconds * factor)
        if whole is not None and whole > 0:
            return f"{whole}{unit}"
    if seconds >= 1e-3:
        return f"{_decimal(seconds * 1e3)}ms"
    return f"{_decimal(seconds * 1e6)}us"


def _whole(value: float) -> int | None:
    """`value` as an int if it is one up to float noise, else None."""
    nearest = round(value)
    return nearest if abs(value - nearest) < 1e-6 else None


def _decimal(value: float) -> str:
    """Up to three decimals without trailing zeros: 1.5, 2.125."""
    return f"{value:.3f}".rstrip("0").rstrip(".")
